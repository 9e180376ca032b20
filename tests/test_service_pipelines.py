"""Worker-side pipeline helpers with a tiny random FLUX transformer (no weights needed)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval()


def _denoise(model, steps: int, reset_at_end: bool) -> None:
    x = torch.randn(1, 16, 4)
    ids = torch.zeros(16, 3)
    for i in range(steps):
        t = torch.full((1,), 1.0 - i / steps)
        with torch.no_grad():
            x = x - 0.1 * model(hidden_states=x, encoder_hidden_states=torch.randn(1, 4, 16),
                                pooled_projections=torch.randn(1, 8), timestep=t, img_ids=ids,
                                txt_ids=torch.zeros(4, 3), return_dict=False)[0]
    if reset_at_end:  # what every diffusers pipeline does at the end of __call__
        model._reset_stateful_cache()


def test_run_statistics_survive_the_pipeline_end_of_call_reset():
    from clusca import apply_clusca, clusca_run

    from service.pipelines import run_owns_hook_state

    model = _tiny_flux()
    apply_clusca(model)
    with clusca_run(model, "fast", num_inference_steps=12) as run:
        with run_owns_hook_state(model):
            _denoise(model, 12, reset_at_end=True)
    stats = run.stats.to_dict()
    assert stats["full_steps"] + stats["cached_steps"] == 12 and stats["cached_steps"] > 0
    assert stats["flops_speedup"] > 1.5
    # The model's own reset is back once the block ends.
    assert "_reset_stateful_cache" not in vars(model)


def test_call_parameters_and_bad_pipeline_class():
    from service.noop import LegacyCallbackNoopPipeline, NoopPipeline
    from service.pipelines import call_parameters, load_pipeline
    from service.registry import ModelEntry

    assert call_parameters(NoopPipeline()) == {"*"}
    legacy = call_parameters(LegacyCallbackNoopPipeline())
    assert "callback" in legacy and "callback_on_step_end" not in legacy
    entry = ModelEntry(name="x", kind="diffusers", path="/nonexistent", pipeline_class="AutoencoderKL")
    with pytest.raises(ValueError, match="not a diffusers pipeline class"):
        load_pipeline(entry, "cpu")
