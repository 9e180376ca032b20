"""Every supported architecture, on a tiny random float32 model driven by an Euler loop.

* every step full (interval 1): output equal to the unhooked model's (max abs diff <= 1e-5);
* default preset: fewer FLOPs, finite output, close to the uncached output;
* removing the hooks restores the original behaviour exactly.

Error bound for the default preset: over 12 steps with warm-up 3 and interval 5, nine
steps are predicted from Taylor factors at most four steps old. On these smooth
trajectories the final latent's relative L2 error stays far below what denoising
itself changes (``|ref - x0| / |ref|``, about 0.5); we require at most a tenth of it.
A broken cache (stale, zero or mixed-up predictions) lands at or above that scale;
the measured errors are 0.002-0.017 relative, i.e. 0.5-3.5% of the change.
"""

import pytest
import torch

from clusca import ClusCaConfig, apply_clusca, clusca_run, remove_clusca
from clusca.install import is_clusca_applied
from clusca.testing import TINY_CASES, euler_sample

STEPS = 12
ARCHS = sorted(TINY_CASES)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models: one thread is faster and far steadier on a shared CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=ARCHS)
def case(request):
    case = TINY_CASES[request.param]()
    x = case.latents(2, seed=3)
    ref = euler_sample(case, x, STEPS)
    return case, x, ref


def test_every_step_full_equals_the_unhooked_model(case):
    case, x, ref = case
    apply_clusca(case.model)
    try:
        with clusca_run(case.model, ClusCaConfig(interval=1), num_inference_steps=STEPS) as run:
            out = euler_sample(case, x, STEPS)
        assert (out - ref).abs().max().item() <= 1e-5
        assert run.stats.full_steps == STEPS and run.stats.cached_steps == 0
        assert run.stats.flops == run.stats.flops_uncached > 0
    finally:
        remove_clusca(case.model)


def test_default_preset_saves_flops_and_stays_close(case):
    case, x, ref = case
    apply_clusca(case.model)
    try:
        with clusca_run(case.model, ClusCaConfig(), num_inference_steps=STEPS) as run:
            out = euler_sample(case, x, STEPS)
    finally:
        remove_clusca(case.model)
    s = run.stats
    # Steps 0, 1, 2, 7 by the schedule, and any the divergence guard ran in full (random weights
    # can move the output fast between steps).
    assert s.full_steps == 4 + s.guard_trips and s.cached_steps == 8 - s.guard_trips and s.calls == STEPS
    assert s.guard_trips <= 1
    assert s.flops < s.flops_uncached and s.flops_speedup > 1.8
    assert 0.0 < s.token_fraction < 0.5
    assert s.kmeans_calls >= 4 and s.cache_bytes > 0
    assert torch.isfinite(out).all()
    rel_err = ((out - ref).norm() / ref.norm()).item()
    change = ((ref - x).norm() / ref.norm()).item()
    assert rel_err <= 0.1 * change, (rel_err, change)
    assert rel_err > 0.0  # the cache really changed the computation


def test_every_comparison_method_runs(case):
    case, x, ref = case
    apply_clusca(case.model)
    try:
        errors = {}
        for mode in ("fora", "taylorseer", "clusca"):
            with clusca_run(case.model, ClusCaConfig(mode=mode), num_inference_steps=STEPS) as run:
                out = euler_sample(case, x, STEPS)
            errors[mode] = ((out - ref).norm() / ref.norm()).item()
            assert run.stats.flops_speedup > 1.5
        # ClusCa spends FLOPs on fresh tokens; the other two do not.
        assert errors["fora"] > 0 and errors["taylorseer"] > 0
    finally:
        remove_clusca(case.model)


def test_removal_restores_the_original_behaviour(case):
    case, x, ref = case
    apply_clusca(case.model)
    with clusca_run(case.model, "fast", num_inference_steps=STEPS):
        euler_sample(case, x, STEPS)
    # Hooked but idle, and mode off: untouched behaviour.
    assert torch.equal(euler_sample(case, x, STEPS), ref)
    with clusca_run(case.model, "off", num_inference_steps=STEPS) as run:
        assert torch.equal(euler_sample(case, x, STEPS), ref)
    assert run.stats.flops_speedup == 1.0 and run.stats.token_fraction == 1.0
    assert run.stats.tokens_computed == run.stats.tokens_uncached > 0
    remove_clusca(case.model)
    assert not is_clusca_applied(case.model)
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in case.model.modules())
    assert torch.equal(euler_sample(case, x, STEPS), ref)
