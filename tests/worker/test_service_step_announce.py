"""The torch runners announce each step to the ClusCa run: cached steps read nothing back."""

from __future__ import annotations

import pytest
import torch

from clusca import ClusCaConfig, apply_clusca, clusca_run, run_state
from clusca.testing import HostReads
from clusca_shapes import WEIGHTS_DIR, ShapesFluxPipeline
from service.worker.runners.diffusers import announce_steps

pytestmark = pytest.mark.skipif(not (WEIGHTS_DIR / "model_index.json").exists(), reason="no built-in checkpoint")

def _generate(announce: bool):
    pipe = ShapesFluxPipeline.from_pretrained(WEIGHTS_DIR)
    apply_clusca(pipe.transformer)
    state = run_state(pipe.transformer)
    reads, modes, full = [], [], []

    def before(mod, args, kwargs):
        modes.append(HostReads().__enter__())

    def after(mod, args, kwargs, out):
        mode = modes.pop()
        mode.__exit__(None, None, None)
        reads.append(mode.count)
        full.append(state.full)  # the schedule's full steps and any the divergence guard added

    pipe.transformer.register_forward_pre_hook(before, with_kwargs=True)
    pipe.transformer.register_forward_hook(after, with_kwargs=True)
    seen = []
    kwargs = dict(prompt=["a red circle on the left"], generator=[torch.Generator().manual_seed(3)],
                  num_inference_steps=12, guidance_scale=5.0, height=32, width=32,
                  callback_on_step_end=lambda p, i, t, k: seen.append(i) or k)
    cfg = ClusCaConfig.preset("fast", order=0, clusters=4)
    with torch.inference_mode(), clusca_run(pipe.transformer, cfg, num_inference_steps=12) as run:
        image = pipe(**(announce_steps(kwargs, run) if announce else kwargs)).images[0]
    assert sum(full) == run.stats.full_steps
    return image, [r for r, f in zip(reads, full) if not f], seen, run.stats


def test_announced_steps_keep_the_image_and_remove_host_reads_from_cached_steps():
    image, cached_reads, seen, stats = _generate(announce=True)
    plain, plain_reads, plain_seen, plain_stats = _generate(announce=False)
    assert seen == plain_seen == list(range(12))  # the caller's own callback still runs
    assert image.tobytes() == plain.tobytes()
    assert (stats.full_steps, stats.cached_steps) == (plain_stats.full_steps, plain_stats.cached_steps)
    assert stats.cached_steps > 0 and set(cached_reads) == {0}
    assert min(plain_reads) > 0  # without it the timestep is read on every call


def test_legacy_callbacks_announce_the_next_step_too():
    from clusca import run_state
    from clusca.testing import tiny_flux

    case = tiny_flux()
    apply_clusca(case.model)
    calls = []
    kwargs = {"callback": lambda i, t, latents: calls.append(i)}
    with torch.inference_mode(), clusca_run(case.model, ClusCaConfig(interval=3, warmup=2)) as run:
        wrapped = announce_steps(kwargs, run)
        x = case.latents(1)
        case.model(**case.make_kwargs(x, 0.9, [1]))
        assert run_state(case.model).step == 0
        wrapped["callback"](6, None, None)
        case.model(**case.make_kwargs(x, 0.8, [1]))
        assert run_state(case.model).step == 7
    assert calls == [6]
