"""One sampling loop for the library's tests and the benchmarks; one PSNR and one SSIM."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks._sampling import FluxInputs  # noqa: E402
from clusca.testing import EulerLoop, euler_sample, tiny_flux  # noqa: E402


def _tiny_flux_model():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()


@torch.no_grad()
def test_flux_loop_is_flow_matching_euler():
    model = _tiny_flux_model()
    inputs = FluxInputs.random(side=4, text_tokens=3, text_dim=32, batch=2)
    steps = 5
    calls: list[int] = []
    synced: list[int] = []
    loop = inputs.loop(model, steps, before_step=calls.append, sync=lambda: synced.append(1))
    out = loop.run()
    # By hand: sigma 1 -> 0 in `steps` equal strides, x <- x + (sigma' - sigma) * v.
    x = inputs.x.clone()
    for i in range(steps):
        s0, s1 = 1 - i / steps, 1 - (i + 1) / steps
        v = model(hidden_states=x, encoder_hidden_states=inputs.encoder_hidden_states,
                  pooled_projections=inputs.pooled_projections, timestep=torch.full((2,), s0),
                  img_ids=inputs.img_ids, txt_ids=inputs.txt_ids, guidance=inputs.guidance, return_dict=False)[0]
        x = x + (s1 - s0) * v
    torch.testing.assert_close(out, x)
    assert calls == list(range(steps)) and len(synced) == steps and len(loop.times) == steps
    # CPU time beside the wall clock, per step: this thread's alone, so never above the step's wall time.
    assert len(loop.cpu_times) == steps and all(0 <= c <= t + 1e-3 for c, t in zip(loop.cpu_times, loop.times))
    assert not torch.equal(out, inputs.x) and torch.equal(loop.x, out)
    # Same seed, same shape: the same inputs, whichever benchmark draws them.
    again = FluxInputs.random(side=4, text_tokens=3, text_dim=32, batch=2)
    assert torch.equal(again.x, inputs.x) and torch.equal(again.encoder_hidden_states, inputs.encoder_hidden_states)


@torch.no_grad()
def test_stepping_two_loops_in_lockstep_equals_running_each():
    case = tiny_flux(side=4)
    x = case.latents(1, seed=2)
    ref = euler_sample(case, x, 6, [3])
    a, b = (EulerLoop(lambda x, s: case.model(**case.make_kwargs(x, s, [3]))[0], x, 6) for _ in range(2))
    for i in range(6):
        a.step(i)
        b.step(i)
    assert torch.equal(a.x, ref) and torch.equal(b.x, ref)


def _sources() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((ROOT / "benchmarks").glob("*.py"))}


def test_benchmarks_have_no_sampling_loop_of_their_own():
    own = {name for name, src in _sources().items() if "linspace(1.0, 0.0" in src}
    assert not own, f"{sorted(own)}: use clusca.testing.EulerLoop (benchmarks/_sampling.py)"
    for name in ("cache_compare.py", "speed_flux.py", "gpu_flux.py", "cached_step.py"):
        assert "FluxInputs" in _sources()[name], name


def test_one_psnr_and_one_ssim_feed_the_benchmarks():
    import benchmarks._metrics as metrics
    import clusca.quality as quality

    assert metrics.psnr is quality.psnr and metrics.ssim is quality.ssim
    for name, src in _sources().items():
        tree = ast.parse(src)
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in ("psnr", "ssim", "_ssim", "gaussian_window")}
        assert not defined, f"{name} defines {defined}: import them from clusca.quality"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and any(a.name in ("psnr", "ssim") for a in node.names):
                assert node.module in ("clusca.quality", "benchmarks._metrics"), (name, node.module)
