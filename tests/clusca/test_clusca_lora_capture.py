"""LoRA adapters with recorded cached steps and compiled regions.

The bank's selection lives in buffers written in place, so a step recorded under one adapter
selection replays correctly under another; whether the bank adds a delta at all is part of the
key a recorded step is kept under, so a step recorded without adapters never replays for a
call with them, nor the reverse. On a CPU, ``OpReplay`` stands in for CUDA graphs: a replay
runs the recorded tensor operations again on the tensors they read, without the Python that
chose them, so a selection held in a new tensor, or a recorded step replayed across the
bank's state, goes stale exactly as under a graph. The test at the end runs real CUDA graphs
and is skipped without CUDA.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from clusca import ClusCaConfig, apply_clusca, clusca_run, compile_clusca
from clusca import capture
from clusca.capture import OpReplay, using_backend
from clusca.lora import LoraBank, LoraWeights
from clusca.testing import EulerLoop, euler_sample, tiny_flux

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TARGETS = [r".*\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|proj_mlp|proj_out)",
           r".*\.ff\.net\.(0\.proj|2)"]
STEPS = 14
CFG = ClusCaConfig(mode="clusca", interval=4, warmup=2, order=1, clusters=4, gamma=0.1)

A = [[(1, 1.0)], [(1, 1.0)]]
B = [[(2, 0.6), (1, 0.3)], [(2, 1.2)]]
MIXED = [[], [(2, 0.9), (1, -0.5)]]
NONE = [[], []]


def _adapter(model, name: str, rank: int, seed: int) -> LoraWeights:
    """Random weights on every targeted layer: the feed-forward layers among them are what a
    cached step runs (for its fresh tokens), so cached steps depend on the selection."""
    g = torch.Generator().manual_seed(seed)
    patterns = [re.compile(t) for t in TARGETS]
    layers = {}
    for module, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(p.fullmatch(module) for p in patterns):
            layers[module] = (torch.randn(rank, mod.in_features, generator=g) * 0.5 / mod.in_features ** 0.5,
                              torch.randn(mod.out_features, rank, generator=g) * 0.5 / rank ** 0.5)
    return LoraWeights(name, rank, layers, alpha=float(rank))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def banked():
    case = tiny_flux()
    apply_clusca(case.model)
    bank = LoraBank(case.model, TARGETS, slots=2, max_rank=8)
    bank.load(1, _adapter(case.model, "outline", 4, seed=5))
    bank.load(2, _adapter(case.model, "pastel", 8, seed=6))
    yield case, bank
    bank.remove()


def _sample(case, bank, chosen, cap: str, cfg: ClusCaConfig = CFG):
    bank.select(chosen)
    cfg = ClusCaConfig(**{**cfg.to_dict(), "capture": cap})
    with torch.inference_mode(), clusca_run(case.model, cfg, num_inference_steps=STEPS) as run:
        out = euler_sample(case, case.latents(len(chosen)), STEPS, list(range(1, len(chosen) + 1)))
    return out, run.stats


def test_select_writes_the_same_buffers_in_place(banked):
    _, bank = banked
    bank.select(A)
    slot, scale = bank._slot, bank._scale
    bank.select(B)
    assert bank._slot is slot and bank._scale is scale
    assert slot.tolist() == [[2, 1], [2, 0]] and torch.allclose(scale, torch.tensor([[0.6, 0.3], [1.2, 0.0]]))
    bank.select(NONE)  # no adapter: nothing written, and the step adds nothing
    assert not bank.active and bank._slot is slot and slot.tolist() == [[2, 1], [2, 0]]
    bank.select([[(1, 0.5)]])  # another image count has buffers of its own, kept as well
    one = bank._slot
    bank.select([[(2, 1.0)]])
    assert bank._slot is one and one.tolist() == [[2, 0]]
    bank.select(MIXED)
    assert bank._slot is slot and slot.tolist() == [[0, 0], [2, 1]]


def test_steps_recorded_with_one_selection_replay_another_exactly(banked):
    case, bank = banked
    with using_backend(OpReplay()):
        eager_a, _ = _sample(case, bank, A, "off")
        got_a, s_a = _sample(case, bank, A, "auto")
        runs = []
        for chosen in (B, MIXED, A):
            eager, _ = _sample(case, bank, chosen, "off")
            got, s = _sample(case, bank, chosen, "auto")
            runs.append((eager, got, s))
    assert s_a.capture == "replayed" and s_a.graph_captures >= 1 and s_a.graph_replays > 0
    assert _rel(got_a, eager_a) <= 1e-6
    for eager, got, s in runs:
        # Another selection of the same family: no new recording, every cached step replayed.
        assert s.graph_captures == 0 and s.graph_replays == s.cached_steps > 0
        assert _rel(got, eager) <= 1e-6
    # The selections differ in what they draw, so equal runs mean the replays read each one.
    assert _rel(runs[0][0], eager_a) > 1e-3 and _rel(runs[1][0], runs[0][0]) > 1e-3


def test_steps_with_and_without_adapters_are_recorded_apart(banked):
    case, bank = banked
    with using_backend(OpReplay()):
        eager_none, _ = _sample(case, bank, NONE, "off")
        eager_a, _ = _sample(case, bank, A, "off")
        _, plain = _sample(case, bank, NONE, "auto")
        got_a, with_a = _sample(case, bank, A, "auto")  # after a run without adapters: records its own
        got_none, again = _sample(case, bank, NONE, "auto")  # and the reverse: replays the plain one
        got_mixed, mixed = _sample(case, bank, MIXED, "auto")  # one image with adapters: the bank is on
    assert plain.graph_captures >= 1
    assert with_a.graph_captures >= 1 and with_a.graph_replays > 0 and _rel(got_a, eager_a) <= 1e-6
    assert again.graph_captures == 0 and again.graph_replays == again.cached_steps
    assert torch.allclose(got_none, eager_none, rtol=0, atol=1e-6)
    assert mixed.graph_captures == 0 and mixed.graph_replays == mixed.cached_steps
    assert _rel(got_mixed, eager_none) > 1e-3


def test_without_the_key_part_a_plain_step_would_replay_for_adapters(banked, monkeypatch):
    # The checks above can fail: without the bank's key part, the run with adapters replays the
    # plain run's recorded steps, which add no delta, and drifts from its eager run.
    case, bank = banked
    monkeypatch.setattr(capture, "key_parts", lambda model: ())
    with using_backend(OpReplay()):
        eager_a, _ = _sample(case, bank, A, "off")
        _sample(case, bank, NONE, "auto")
        got_a, with_a = _sample(case, bank, A, "auto")
    assert with_a.graph_captures == 0 and with_a.graph_replays > 0
    assert _rel(got_a, eager_a) > 1e-3


def test_a_selection_swapped_for_new_tensors_would_be_caught(banked, monkeypatch):
    # And a bank that put each selection in new tensors (as it once did) would replay the
    # recording call's adapters under the next selection.
    case, bank = banked
    select = LoraBank.select

    def fresh_tensors(self, per_image):
        select(self, per_image)
        self._slot, self._scale = self._slot.clone(), self._scale.clone()

    monkeypatch.setattr(LoraBank, "select", fresh_tensors)
    with using_backend(OpReplay()):
        _sample(case, bank, A, "auto")
        eager_b, _ = _sample(case, bank, B, "off")
        got_b, s = _sample(case, bank, B, "auto")
    assert s.graph_replays > 0 and _rel(got_b, eager_b) > 1e-3


def test_the_bank_registers_its_key_part_and_takes_it_away():
    case = tiny_flux()
    bank = LoraBank(case.model, TARGETS, slots=1, max_rank=4)
    bank.load(1, _adapter(case.model, "a", 4, seed=1))
    assert capture.key_parts(case.model) == (("lora", None),)
    bank.select([[(1, 1.0)], [], [(1, 0.5)]])
    assert capture.key_parts(case.model) == (("lora", bank.uid, 3, 2),)
    bank.remove()
    assert capture.key_parts(case.model) == ()
    # A bank installed later reads other buffers: its recorded steps are its own.
    other = LoraBank(case.model, TARGETS, slots=1, max_rank=4)
    other.load(1, _adapter(case.model, "a", 4, seed=1))
    other.select([[(1, 1.0)], [], [(1, 0.5)]])
    assert other.uid != bank.uid and capture.key_parts(case.model) == (("lora", other.uid, 3, 2),)


def test_switching_adapters_never_recompiles_the_compiled_regions(banked):
    case, bank = banked
    torch._dynamo.reset()
    counters.clear()
    compile_clusca(case.model, backend="eager")
    # Both states of the bank (a delta or none) compile once; the first runs also settle which
    # Python numbers dynamo treats as inputs.
    for chosen in (A, NONE, A, NONE):
        _sample(case, bank, chosen, "off")
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    torch._dynamo.config.error_on_recompile = True
    try:
        for chosen in (B, MIXED, [[(2, -1.5)], [(1, 0.2), (2, 0.2)]], NONE, A):
            _sample(case, bank, chosen, "off")
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"], dict(counters["graph_break"])


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_graphs_recorded_with_adapters_replay_another_selection():
    case = tiny_flux()
    case.model.to("cuda", torch.bfloat16)
    apply_clusca(case.model)
    bank = LoraBank(case.model, TARGETS, slots=2, max_rank=8)
    bank.load(1, _adapter(case.model, "outline", 4, seed=5))
    bank.load(2, _adapter(case.model, "pastel", 8, seed=6))

    def velocity(x, sigma):
        kw = {k: (v.to("cuda", torch.bfloat16) if torch.is_floating_point(v) else v.to("cuda"))
              if isinstance(v, torch.Tensor) else v for k, v in case.make_kwargs(x, sigma, [1, 2]).items()}
        return case.model(**kw)[0].float()

    def run(chosen, cap):
        bank.select(chosen)
        cfg = ClusCaConfig(**{**CFG.to_dict(), "capture": cap})
        with torch.inference_mode(), clusca_run(case.model, cfg, num_inference_steps=STEPS) as r:
            out = EulerLoop(velocity, case.latents(2).cuda(), STEPS).run()
        return out, r.stats

    _, first = run(A, "auto")
    assert first.capture == "replayed" and first.graph_replays > 0
    for chosen in (B, MIXED, NONE, A):
        eager, _ = run(chosen, "off")
        got, s = run(chosen, "auto")
        assert s.graph_replays > 0 and _rel(got, eager) <= 2e-2, (chosen, _rel(got, eager))
