"""Graph capture of the lean cached step (``capture="auto"``, ``clusca.capture``).

A CUDA graph replays the memory it was recorded with. On a CPU, ``CallReplay`` records by
keeping the step function and replays it on the very buffers it was recorded with, so a
step that read anything but its buffers (a stale input, fresh rows, step offset or cluster
index) gives a different result here exactly as it would under a graph. The tests at the
end run a real CUDA graph and are skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from clusca import ClusCaConfig, apply_clusca, clusca_run
from clusca import capture
from clusca.capture import CallReplay, using_backend
from clusca.testing import EulerLoop, euler_sample, tiny_flux, tiny_hunyuan_video, tiny_sd3

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CASES = {"flux": tiny_flux, "hunyuan": tiny_hunyuan_video, "sd3": tiny_sd3,
         "sd35": lambda: tiny_sd3(dual_attention=True)}
STEPS = 14


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _sample(case, cfg: ClusCaConfig, cap: str, steps: int = STEPS, batch: int = 2):
    cfg = ClusCaConfig(**{**cfg.to_dict(), "capture": cap})
    with torch.inference_mode(), clusca_run(case.model, cfg, num_inference_steps=steps) as run:
        out = euler_sample(case, case.latents(batch), steps, list(range(1, batch + 1)))
    return out, run.stats


@pytest.mark.parametrize("arch", list(CASES))
@pytest.mark.parametrize("mode,order", [("fora", 0), ("taylorseer", 1), ("taylorseer", 2), ("clusca", 0),
                                        ("clusca", 1), ("clusca", 2)])
def test_replayed_cached_steps_equal_the_eager_ones(arch, mode, order):
    case = CASES[arch]()
    apply_clusca(case.model)
    cfg = ClusCaConfig(mode=mode, interval=4, warmup=2, order=order, clusters=4, gamma=0.1)
    with using_backend(CallReplay()):
        eager, s_eager = _sample(case, cfg, "off")
        replayed, s = _sample(case, cfg, "auto")
    assert _rel(replayed, eager) <= 1e-6
    assert s_eager.graph_replays == 0 and s_eager.capture == "off"
    # One recording per kind of cached step (the number of valid factors grows over the first
    # full steps), every other cached step replayed.
    assert s.capture == "replayed"
    assert 1 <= s.graph_captures <= order + 1
    assert s.graph_captures + s.graph_replays == s.cached_steps
    assert s.flops == s_eager.flops and s.tokens_computed == s_eager.tokens_computed


@pytest.mark.parametrize("stale", ["hidden_states", "step_offset", "fresh_rows", "cluster_index"])
def test_a_replay_that_missed_an_input_would_be_caught(stale, monkeypatch):
    # The check above can fail: drop one of the copies into the recorded buffers and the
    # replayed run drifts from the eager one.
    load = capture.StaticInputs.load

    def leaky(self, hs, kwargs, d, rows, flat_index):
        hs = self.hs if stale == "hidden_states" else hs
        d = 1 if stale == "step_offset" else d
        rows = None if stale == "fresh_rows" else rows
        flat_index = None if stale == "cluster_index" else flat_index
        return load(self, hs, kwargs, d, rows, flat_index)

    case = tiny_flux()
    apply_clusca(case.model)
    cfg = ClusCaConfig(mode="clusca", interval=4, warmup=2, order=1, clusters=4, gamma=0.1)
    with using_backend(CallReplay()):
        eager, _ = _sample(case, cfg, "off", steps=16)
        monkeypatch.setattr(capture.StaticInputs, "load", leaky)
        replayed, s = _sample(case, cfg, "auto", steps=16)
    assert s.graph_replays > 0
    assert _rel(replayed, eager) > 1e-4


class _Wrong(CallReplay):
    """Replays a result a little off (as a graph that read a stale buffer would)."""

    def record(self, fn, restore):
        replay, output = super().record(fn, restore)
        return replay, lambda: output() * 1.01


class _Unrecordable(CallReplay):
    def record(self, fn, restore):
        raise RuntimeError("operation not permitted when stream is capturing")


@pytest.mark.parametrize("recorder,reason", [(_Wrong, "replay differs from the eager step"),
                                             (_Unrecordable, "recording failed: RuntimeError")])
def test_a_step_that_fails_its_check_runs_eagerly_and_says_why(recorder, reason, caplog):
    case = tiny_flux()
    apply_clusca(case.model)
    cfg = ClusCaConfig(mode="clusca", interval=4, warmup=2, order=1, clusters=4, gamma=0.1)
    with using_backend(CallReplay()):
        eager, _ = _sample(case, cfg, "off")
    with using_backend(recorder()), caplog.at_level("WARNING", logger="clusca.capture"):
        out, s = _sample(case, cfg, "auto")
    assert _rel(out, eager) <= 1e-6
    assert s.graph_replays == 0 and s.graph_captures == 0
    assert s.capture.startswith("eager: ") and reason in s.capture
    assert any(reason in r.getMessage() for r in caplog.records)


def test_without_cuda_nothing_is_recorded_and_the_stats_say_why():
    case = tiny_flux()
    apply_clusca(case.model)
    cfg = ClusCaConfig(mode="clusca", interval=4, warmup=2, order=1, clusters=4, gamma=0.1)
    eager, _ = _sample(case, cfg, "off")
    out, s = _sample(case, cfg, "auto")
    assert torch.equal(out, eager)
    assert s.graph_replays == 0 and s.capture == "unavailable: no CUDA device (the model is on cpu)"


def _conditioned(case, cfg: ClusCaConfig, cap: str, seeds, steps: int = STEPS):
    cfg = ClusCaConfig(**{**cfg.to_dict(), "capture": cap})
    with torch.inference_mode(), clusca_run(case.model, cfg, num_inference_steps=steps) as run:
        out = euler_sample(case, case.latents(len(seeds), seed=seeds[0]), steps, seeds)
    return out, run.stats


def test_a_later_request_of_the_same_family_replays_from_its_first_cached_step():
    case = tiny_flux()
    apply_clusca(case.model)
    cfg = ClusCaConfig(mode="clusca", interval=4, warmup=2, order=1, clusters=4, gamma=0.1)
    with using_backend(CallReplay()):
        _, first = _conditioned(case, cfg, "auto", [1, 2])
        # Another prompt, seed and fresh-token seed: the same settings and shapes reuse the
        # recorded steps, and the kept buffers now hold this request's factors.
        cfg2 = ClusCaConfig(**{**cfg.to_dict(), "seed": 7})
        eager, _ = _conditioned(case, cfg2, "off", [5, 6])
        again, second = _conditioned(case, cfg2, "auto", [5, 6])
    assert first.graph_captures >= 1
    assert second.graph_captures == 0 and second.graph_replays == second.cached_steps
    assert _rel(again, eager) <= 1e-6


def test_a_new_shape_or_other_settings_record_anew_and_only_the_last_family_is_kept(monkeypatch):
    case = tiny_flux()
    apply_clusca(case.model)
    a = ClusCaConfig(mode="taylorseer", interval=4, warmup=2, order=1)
    b = ClusCaConfig(mode="taylorseer", interval=3, warmup=2, order=1)
    with using_backend(CallReplay()):
        _, s1 = _sample(case, a, "auto", batch=1)
        _, s2 = _sample(case, a, "auto", batch=2)  # new shape: records
        _, s3 = _sample(case, b, "auto", batch=2)  # new settings: records
        _, s4 = _sample(case, a, "auto", batch=2)  # evicted by b (one family kept): records
        monkeypatch.setenv("CLUSCA_CAPTURE_KEEP", "2")
        _, s5 = _sample(case, b, "auto", batch=2)
        _, s6 = _sample(case, a, "auto", batch=2)  # two kept: replays at once
    assert all(s.graph_captures >= 1 for s in (s1, s2, s3, s4, s5))
    assert s6.graph_captures == 0 and s6.graph_replays == s6.cached_steps


def test_changed_weights_drop_what_was_recorded():
    case = tiny_flux()
    apply_clusca(case.model)
    cfg = ClusCaConfig(mode="taylorseer", interval=4, warmup=2, order=1)
    with using_backend(CallReplay()):
        _sample(case, cfg, "auto")
        with torch.no_grad():
            case.model.proj_out.weight.mul_(1.5)  # in place, as fusing a LoRA does
        eager, _ = _sample(case, cfg, "off")
        out, s = _sample(case, cfg, "auto")
    assert s.graph_captures >= 1
    assert _rel(out, eager) <= 1e-6


def test_the_memory_budget_stops_recording(monkeypatch):
    monkeypatch.setenv("CLUSCA_CAPTURE_BUDGET_MB", "0")
    case = tiny_flux()
    apply_clusca(case.model)
    cfg = ClusCaConfig(mode="taylorseer", interval=4, warmup=2, order=1)
    with using_backend(CallReplay()):
        eager, _ = _sample(case, cfg, "off")
        out, s = _sample(case, cfg, "auto")
    assert torch.equal(out, eager)
    assert s.graph_replays == 0 and "capture memory budget reached" in s.capture


def test_capture_is_a_validated_setting():
    assert ClusCaConfig.from_dict({"preset": "fast", "capture": "off"}).capture == "off"
    with pytest.raises(ValueError, match="^capture: must be one of"):
        ClusCaConfig.from_dict({"capture": "always"})


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("arch", ["flux", "sd35", "hunyuan"])
def test_cuda_graph_replays_match_eager_in_bfloat16(arch):
    case = CASES[arch]()
    case.model.to("cuda", torch.bfloat16)
    apply_clusca(case.model)
    cfg = ClusCaConfig(mode="clusca", interval=4, warmup=2, order=1, clusters=4, gamma=0.1)

    def velocity(x, sigma):
        kw = {k: (v.to("cuda", torch.bfloat16) if torch.is_floating_point(v) else v.to("cuda"))
              if isinstance(v, torch.Tensor) else v for k, v in case.make_kwargs(x, sigma, [1, 2]).items()}
        out = case.model(**kw)[0].float()
        return out if out.shape == x.shape else out[:, : case.out_channels]

    outs = {}
    for cap in ("off", "auto"):
        c = ClusCaConfig(**{**cfg.to_dict(), "capture": cap})
        with torch.inference_mode(), clusca_run(case.model, c, num_inference_steps=STEPS) as run:
            outs[cap] = EulerLoop(velocity, case.latents(2).cuda(), STEPS).run()
        outs[cap + "_stats"] = run.stats
    s = outs["auto_stats"]
    assert s.capture == "replayed" and s.graph_replays > 0
    assert s.graph_captures + s.graph_replays == s.cached_steps
    assert _rel(outs["auto"], outs["off"]) <= 2e-2
