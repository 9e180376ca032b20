"""The benchmark's cache adapter: FLOPs counting, run statistics, diffusers cache memory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks._caches import Env, Method, activate, count_flops, diffusers_cache_bytes  # noqa: E402
from clusca import ClusCaConfig  # noqa: E402
from clusca.testing import euler_sample, tiny_flux  # noqa: E402


class _Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_count_flops_includes_cpu_attention():
    b, h, lq, lk, d = 2, 3, 5, 7, 4
    q, k, v = torch.randn(b, h, lq, d), torch.randn(b, h, lk, d), torch.randn(b, h, lk, d)
    mod = _Attention()
    with count_flops(mod) as fl:
        mod(q, k, v)
    # Q K^T and (attention) V: 2 flops per multiply-add, each over (b, h, lq, lk, d).
    assert fl[0] == 2 * (2 * b * h * lq * lk * d)


class _Other(torch.nn.Linear):
    pass


def test_count_flops_only_counts_the_given_model():
    lin = torch.nn.Linear(8, 16)
    other = _Other(8, 32)
    x = torch.randn(3, 8)
    with count_flops(lin) as fl:
        lin(x)
        other(x)
    assert fl[0] == 2 * 3 * 8 * 16


def _run(case, method, steps, reset_at_end: bool):
    env = Env(steps=steps)
    x = case.latents(1)
    with activate(method, case.model, env) as probe:
        with count_flops(case.model) as fl:
            out = euler_sample(case, x, steps)
        if reset_at_end:
            # What every diffusers pipeline does when it returns (maybe_free_model_hooks).
            case.model._reset_stateful_cache()
    return out, probe, fl[0]


@pytest.fixture(scope="module")
def case():
    return tiny_flux(side=6)


def test_clusca_stats_survive_a_pipeline_reset(case):
    steps = 8
    cfg = ClusCaConfig.preset("balanced")
    _, probe, measured = _run(case, Method("b", "ClusCa", clusca=cfg), steps, reset_at_end=True)
    _, base, measured_base = _run(case, Method("u", "uncached"), steps, reset_at_end=True)
    assert probe.stats is not None and base.stats is None
    assert probe.stats.full_steps == len(cfg.full_steps(steps)) == 4
    assert probe.stats.cached_steps == steps - 4
    assert probe.cache_bytes == probe.stats.cache_bytes > 0
    # The library's analytic FLOPs and the counter's measured FLOPs tell the same story.
    assert probe.stats.flops_uncached == pytest.approx(measured_base, rel=0.02)
    assert probe.stats.flops == pytest.approx(measured, rel=0.02)


def test_diffusers_cache_is_enabled_for_one_run_and_its_memory_counted(case):
    from diffusers import TaylorSeerCacheConfig

    steps = 8
    method = Method("ts", "diffusers TaylorSeer", diffusers=lambda env: TaylorSeerCacheConfig(
        cache_interval=3, disable_cache_before_step=2, taylor_factors_dtype=None))
    ref, _, fl_ref = _run(case, Method("u", "uncached"), steps, False)
    out, probe, fl = _run(case, method, steps, False)
    assert not case.model.is_cache_enabled  # removed again after the run
    assert fl < fl_ref  # attention was skipped on predicted steps
    assert not torch.equal(out, ref)
    # Order-1 factors (2 tensors) of every hooked attention output, float32.
    assert probe.cache_bytes > 0
    n_attn = sum(1 for name, _ in case.model.named_modules() if name.endswith(".attn"))
    assert probe.cache_bytes >= n_attn * 2 * 4 * 6 * 6  # at least one 6x6-token row per factor
    assert diffusers_cache_bytes(case.model) == 0
    # The same run again gives the same output: no state leaks between runs.
    out2, _, _ = _run(case, method, steps, False)
    assert torch.equal(out, out2)
