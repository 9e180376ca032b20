"""The FLOPs probe runs once per call shape: later runs with the same shapes reuse its counts."""

import pytest
import torch

from clusca import ClusCaConfig, apply_clusca, clusca_run
from clusca.testing import euler_sample, tiny_flux


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _hooks_seen_by(module: torch.nn.Module) -> list[int]:
    """Forward hooks present on ``module`` at each of its calls (the probe adds one)."""
    seen: list[int] = []
    module.register_forward_pre_hook(lambda mod, args: seen.append(len(mod._forward_hooks)))
    return seen


def _run(case, cfg, batch: int = 2, steps: int = 4):
    with clusca_run(case.model, cfg, num_inference_steps=steps) as run:
        euler_sample(case, case.latents(batch, seed=3), steps)
    return run.stats.to_dict()


@pytest.mark.parametrize("mode", ["off", "clusca"])
def test_same_shapes_reuse_the_probe_with_identical_stats(mode):
    case = tiny_flux()
    apply_clusca(case.model)
    cfg = ClusCaConfig.preset("balanced") if mode == "clusca" else ClusCaConfig(mode="off")
    linear = case.model.transformer_blocks[0].ff.net[2]
    assert isinstance(linear, torch.nn.Linear)
    seen = _hooks_seen_by(linear)
    first = _run(case, cfg)
    probed = [n for n in seen if n]
    seen.clear()
    second = _run(case, cfg)
    assert probed, "the first run did not probe"
    assert not any(seen), "the second run with the same shapes probed again"
    assert second == {**first, "kmeans_ms": second["kmeans_ms"]}
    assert first["flops"] > 0 and first["tokens_uncached"] > 0


def test_new_shapes_are_probed_and_counted_as_a_fresh_model_counts_them():
    case = tiny_flux()
    apply_clusca(case.model)
    cfg = ClusCaConfig(mode="off")
    small = _run(case, cfg, batch=1)
    seen = _hooks_seen_by(case.model.transformer_blocks[0].ff.net[2])
    big = _run(case, cfg, batch=3)
    assert any(seen), "a new batch size must be probed"
    assert big["flops_uncached"] == 3 * small["flops_uncached"]

    fresh = tiny_flux()
    apply_clusca(fresh.model)
    assert _run(fresh, cfg, batch=3) == big


def test_a_call_that_raises_is_not_remembered():
    case = tiny_flux()
    apply_clusca(case.model)
    cfg = ClusCaConfig(mode="off")
    block = case.model.single_transformer_blocks[-1]

    def fail(mod, args, kwargs):
        raise RuntimeError("stop in the middle of the call")

    handle = block.register_forward_pre_hook(fail, with_kwargs=True)
    with pytest.raises(RuntimeError), clusca_run(case.model, cfg, num_inference_steps=2):
        case.model(**case.make_kwargs(case.latents(2), 1.0, 0))
    handle.remove()
    fresh = tiny_flux()
    apply_clusca(fresh.model)
    assert _run(case, cfg) == _run(fresh, cfg)
