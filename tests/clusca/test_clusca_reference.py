"""The library's cached steps against a frozen reference of their math.

For every supported architecture, in modes fora, taylorseer and clusca at orders 0, 1 and
2, a 20-step run of the library agrees with the reference hooks (tests/clusca/reference_clusca)
within 1e-5 relative L2 in float32, and both report the same tokens and FLOPs.

The reference is the cached steps' math on the fixed schedule; the divergence guard only
chooses which steps run in full (tests/clusca/test_clusca_guard.py), so it is off here.
"""

from __future__ import annotations

import copy

import pytest
import torch

from clusca import ClusCaConfig, clusca_run
from clusca.testing import TINY_CASES, euler_sample
from tests.clusca.reference_clusca import reference_run

STEPS = 20
TOL = 1e-5


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _configs():
    for mode in ("fora", "taylorseer", "clusca"):
        for order in (0, 1, 2):
            if mode == "fora" and order:
                continue  # fora forces order 0
            yield mode, order


CONFIGS = list(_configs())


@pytest.fixture(scope="module", params=sorted(TINY_CASES))
def case_pair(request):
    case = TINY_CASES[request.param]()
    ref = copy.deepcopy(case)
    return case, ref


@pytest.mark.parametrize("mode,order", CONFIGS, ids=[f"{m}-o{o}" for m, o in CONFIGS])
def test_lean_path_matches_reference(case_pair, mode, order):
    case, ref = case_pair
    cfg = ClusCaConfig(mode=mode, interval=3, warmup=2, order=order, clusters=4, gamma=0.05, seed=3, guard=False)
    x = case.latents(2, seed=5)
    with torch.inference_mode():
        with clusca_run(case.model, cfg, num_inference_steps=STEPS) as run:
            got = euler_sample(case, x, STEPS, seeds=[11, 12])
        with reference_run(ref.model, cfg, num_inference_steps=STEPS) as ctrl:
            want = euler_sample(ref, x, STEPS, seeds=[11, 12])
            counters = ctrl.counters
            want_tokens, want_flops = counters.tokens_computed, counters.flops
    assert run.stats.cached_steps > 0
    assert _rel_l2(got, want) < TOL, (case.name, mode, order, _rel_l2(got, want))
    assert run.stats.tokens_computed == want_tokens
    assert run.stats.flops == want_flops


@pytest.mark.parametrize("propagation,fresh", [("anchored", 1), ("paper", 2), ("anchored", 3)])
def test_clusca_variants_match_reference(case_pair, propagation, fresh):
    case, ref = case_pair
    cfg = ClusCaConfig(mode="clusca", interval=4, warmup=2, order=1, clusters=3, fresh_tokens=fresh, gamma=0.2,
                       propagation=propagation, seed=1, guard=False)
    x = case.latents(1, seed=2)
    with torch.inference_mode():
        with clusca_run(case.model, cfg, num_inference_steps=STEPS):
            got = euler_sample(case, x, STEPS, seeds=[4])
        with reference_run(ref.model, cfg, num_inference_steps=STEPS):
            want = euler_sample(ref, x, STEPS, seeds=[4])
    assert _rel_l2(got, want) < TOL, (case.name, propagation, fresh, _rel_l2(got, want))


def test_control_net_residuals_between_blocks_match_reference():
    # A residual added between single-stream blocks cuts the chain's telescoped sum; the
    # lean cached step steps aside for such calls. Both must keep the reference's results.
    from clusca.testing import tiny_flux

    case = tiny_flux()
    ref = copy.deepcopy(case)
    g = torch.Generator().manual_seed(3)
    n_tokens = case.latent_shape[0]
    dim = case.model.inner_dim
    extra = {"controlnet_block_samples": [0.1 * torch.randn(1, n_tokens, dim, generator=g)],
             "controlnet_single_block_samples": [0.1 * torch.randn(1, n_tokens, dim, generator=g) for _ in range(2)]}
    cfg = ClusCaConfig(mode="clusca", interval=3, warmup=2, order=1, clusters=4, gamma=0.1, guard=False)

    def run(c, runner):
        x = c.latents(1, seed=1)
        sigmas = torch.linspace(1.0, 0.0, STEPS + 1).tolist()
        with torch.inference_mode(), runner(c.model, cfg, num_inference_steps=STEPS):
            for i in range(STEPS):
                x = x + (sigmas[i + 1] - sigmas[i]) * c.model(**c.make_kwargs(x, sigmas[i], [2]), **extra)[0]
        return x

    got, want = run(case, clusca_run), run(ref, reference_run)
    assert _rel_l2(got, want) < TOL
