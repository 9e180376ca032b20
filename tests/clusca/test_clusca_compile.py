"""torch.compile with the cache installed (inductor on the CPU, tiny FLUX model)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from clusca import ClusCaConfig, apply_clusca, clusca_run, compile_clusca, run_state, uncompile_clusca
from clusca.testing import euler_sample, tiny_flux

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 50


def _run(case, cfg, steps=STEPS):
    with torch.inference_mode(), clusca_run(case.model, cfg, num_inference_steps=steps) as run:
        out = euler_sample(case, case.latents(1, seed=9), steps, [5])
        lean = run_state(case.model).lean_steps
    return out, run.stats, lean


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_compiled_regions_match_eager_with_no_graph_break_and_bounded_recompiles():
    torch._dynamo.reset()
    counters.clear()
    case = tiny_flux()
    eager = copy.deepcopy(case)
    apply_clusca(case.model)
    apply_clusca(eager.model)
    compile_clusca(case.model)
    first = ClusCaConfig.preset("fast", clusters=4)
    got, stats, lean = _run(case, first)
    want, _, _ = _run(eager, first)
    assert lean == stats.cached_steps > 30
    assert _rel(got, want) < 1e-5
    graphs = counters["stats"]["unique_graphs"]
    assert not counters["graph_break"], dict(counters["graph_break"])
    # A 50-step run: one graph per compiled module kind and variant (first full step, later
    # full steps with two factors, the cached block), not one per step.
    assert 0 < graphs <= 14, graphs

    # Requests that change only cache settings: a few new graphs at most, then none.
    others = [ClusCaConfig.preset("balanced", clusters=3, gamma=0.02),
              ClusCaConfig.preset("quality", clusters=5, gamma=0.001, seed=4),
              ClusCaConfig.preset("fast", clusters=4, gamma=0.3, seed=8)]
    for cfg in others:
        got, stats, lean = _run(case, cfg)
        want, _, _ = _run(eager, cfg)
        assert lean == stats.cached_steps > 0 and _rel(got, want) < 1e-5
    after_others = counters["stats"]["unique_graphs"]
    assert after_others - graphs <= 2, (graphs, after_others)
    _run(case, ClusCaConfig.preset("balanced", clusters=6, gamma=0.05, seed=1))
    assert counters["stats"]["unique_graphs"] == after_others
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_uncompile_returns_to_eager():
    case = tiny_flux()
    ctrl = apply_clusca(case.model)
    compile_clusca(case.model, backend="eager")
    assert ctrl.adapter.compiled and all(h.compiled is not None for h in ctrl.slot_hooks if h.slot.role != "text")
    uncompile_clusca(case.model)
    assert not ctrl.adapter.compiled and all(h.compiled is None for h in ctrl.slot_hooks)


def test_compile_needs_the_hooks():
    with pytest.raises(ValueError, match="apply_clusca first"):
        compile_clusca(tiny_flux().model)


def test_compiled_runs_count_the_same_flops_and_reuse_their_graphs_after_reinstalling():
    from clusca import remove_clusca

    case = tiny_flux()
    cfg = ClusCaConfig.preset("fast", clusters=4)
    apply_clusca(case.model)
    _, eager_stats, _ = _run(case, cfg, steps=12)
    remove_clusca(case.model)
    apply_clusca(case.model)
    compile_clusca(case.model)
    _, stats, _ = _run(case, cfg, steps=12)
    assert (stats.flops, stats.flops_uncached) == (eager_stats.flops, eager_stats.flops_uncached)
    graphs = counters["stats"]["unique_graphs"]
    remove_clusca(case.model)
    apply_clusca(case.model)
    compile_clusca(case.model)
    _run(case, cfg, steps=12)
    assert counters["stats"]["unique_graphs"] == graphs
