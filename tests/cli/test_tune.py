"""`clusca tune`: per-model tuning of the cache presets, and the service serving the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from tests.support import ROOT, clusca_serve
from clusca import ClusCaConfig
from clusca.config import PRESETS
from clusca.tune import (TuneError, canonical, key_of, label, pareto_front, pick_presets, preset_overrides, psnr,
                         search_space, ssim, tune_with)
from service.registry import Registry
from service.cli.tune import TuneInputError, side_files, tune_model

# A built-in entry on a short schedule, so that a tiny budget still measures something.
SHORT_BUILTIN = """models:
  - name: shapes
    kind: builtin
    defaults: {width: 32, height: 32, steps: 10, guidance: 5.0, cache: balanced}
"""


# ---------------------------------------------------------------------------- the pieces
def test_pareto_front_and_picks_follow_the_documented_rules():
    pts = [(1.5, 40.0), (2.0, 35.0), (2.0, 30.0), (3.0, 31.0), (2.5, 20.0), (3.0, 31.0)]
    assert pareto_front(pts) == [0, 1, 3]  # dominated ones and the duplicate are off the front
    # the best PSNR at least as fast as the anchor and a step (1.1x) faster than the preset
    # before it; none that fast: without the step; none as fast as the anchor: the fastest
    assert pick_presets(pts, {"quality": 1.6, "balanced": 2.0, "fast": 5.0}) == {"quality": 1, "balanced": 3,
                                                                               "fast": 3}
    assert pick_presets(pts, {"quality": 1.6, "balanced": 1.7}, step=1.0) == {"quality": 1, "balanced": 1}
    assert pick_presets([(2.0, 35.0), (2.1, 34.0)], {"quality": 1.0, "balanced": 2.0}) == {"quality": 0,
                                                                                          "balanced": 0}
    assert pick_presets([(2.0, 35.0), (2.1, 30.0)], {"quality": 1.0, "balanced": 2.5}) == {"quality": 0,
                                                                                          "balanced": 1}
    assert pick_presets(pts, {"quality": 1.0}, eligible=[False, True, True, True, True, True]) == {"quality": 1}


def test_quality_metrics():
    rng = np.random.default_rng(0)
    a = rng.random((16, 16, 3))
    assert psnr(a, a) == 100.0 and abs(ssim(a, a) - 1.0) < 1e-9
    b = np.clip(a + 0.01 * rng.standard_normal(a.shape), 0, 1)
    assert 38 < psnr(a, b) < 42 and 0.9 < ssim(a, b) < 1.0


def test_search_space_is_valid_and_free_of_duplicates():
    space = search_space(40)
    keys = [key_of(c) for c in space]
    assert len(keys) == len(set(keys)) > 100
    modes = {c.mode for c in space}
    assert modes == {"fora", "taylorseer", "clusca"}
    for knob in ("interval", "warmup", "order", "predictor", "clusters", "gamma", "propagation", "guidance_pairs"):
        assert len({getattr(c, knob) for c in space}) > 1, knob
    assert all(canonical(c) == c for c in space)
    # FORA ignores order and clusters: one run, one key
    assert key_of(ClusCaConfig(mode="fora", interval=4, order=2, clusters=8)) == key_of(
        ClusCaConfig(mode="fora", interval=4))
    # The predictor only weighs factors of order 1 and up: at order 0 it is not a new setting.
    assert key_of(ClusCaConfig(mode="clusca", order=0, predictor="hermite", hermite_scale=0.7)) == key_of(
        ClusCaConfig(mode="clusca", order=0))
    hermite = [c for c in space if c.predictor == "hermite"]
    assert hermite and all(c.order > 0 and " H" in label(c) for c in hermite)
    assert preset_overrides("balanced", PRESETS["balanced"]) == {}
    over = preset_overrides("fast", ClusCaConfig(mode="clusca", interval=5, order=0, clusters=4, gamma=0.0))
    assert ClusCaConfig.from_dict({"preset": "fast", **over}) == ClusCaConfig(mode="clusca", interval=5, order=0,
                                                                               clusters=4, gamma=0.0)


class FakeModel:
    """A stand-in pipeline: the error of a setting grows with its interval and order; counts every image."""

    def __init__(self, stop_after: int | None = None):
        self.calls: list[tuple[str, int]] = []
        self.stop_after = stop_after

    def __call__(self, cfg, items):
        images = []
        timing = len(items) == 1 and items[0][0] == "prompt 0"  # wall-clock runs: batch 1 on the first image
        for prompt, seed in items:
            rng = np.random.default_rng(abs(hash((prompt, seed))) % 2**32)
            img = rng.random((8, 8, 3))
            if cfg is not None:
                if self.stop_after is not None and len(self.calls) >= self.stop_after:
                    raise KeyboardInterrupt  # the operator presses Ctrl-C
                if not timing:
                    self.calls.append((key_of(cfg), prompt))
                err = 0.002 * cfg.interval * (1 + cfg.effective_order) + (0.003 if cfg.mode == "fora" else 0)
                img = np.clip(img + err * np.random.default_rng(seed).standard_normal(img.shape), 0, 1)
            images.append(img)
        time.sleep(0.001)
        stats = None if cfg is None else {"flops_speedup": cfg.interval * 0.8, "cache_bytes": 100 * cfg.clusters,
                                          "full_steps": 10}
        return np.stack(images), stats


def test_resume_continues_without_repeating_measured_candidates(tmp_path):
    items = [(f"prompt {i}", 0) for i in range(12)]
    journal = tmp_path / "m.json"
    first = FakeModel(stop_after=40)
    with pytest.raises(KeyboardInterrupt):
        tune_with(first, items, minutes=0.3, steps=20, journal=journal, meta={"model": "fake"}, batch=2,
                  progress=lambda _m: None)
    partial = json.loads(journal.read_text())
    assert partial["complete"] is False and len(first.calls) == 40
    measured = sum(c["prompts_measured"] for c in partial["candidates"])
    assert measured == 40  # every image measured before the interrupt was saved

    second = FakeModel()
    res = tune_with(second, items, minutes=0.3, steps=20, journal=journal, resume=True, meta={"model": "fake"},
                    batch=2, progress=lambda _m: None)
    assert not set(first.calls) & set(second.calls)  # nothing measured twice
    assert res.complete and set(res.picks) == {"quality", "balanced", "fast"}
    done = json.loads(journal.read_text())
    assert done["complete"] is True and len(done["candidates"]) == len(partial["candidates"])
    # the finalists saw every image of the last rung, the library presets among them
    final = res.final_items
    assert len(final) == res.meta["final_prompts"] and all(all(i in res.by_key(k).items for i in final)
                                                           for k in res.final)
    lib = [c for c in res.candidates if c.origin.startswith("library")]
    assert len(lib) == 3 and all(set(final) <= set(c.items) and c.wall_speedup for c in lib)
    # resuming again measures only what is still missing (nothing, once every rung is done)
    third = FakeModel()
    again = tune_with(third, items, minutes=0.2, steps=20, journal=journal, resume=True, meta={"model": "fake"},
                      batch=2, progress=lambda _m: None)
    assert not set(third.calls) & (set(first.calls) | set(second.calls))
    if res.meta["all_rungs"]:
        assert third.calls == [] and again.picks == res.picks
    # partial results of other settings are refused, not mixed in
    with pytest.raises(TuneError, match="seeds"):
        tune_with(FakeModel(), items, minutes=0.1, steps=20, journal=journal, resume=True,
                  meta={"model": "fake", "seeds": 3}, progress=lambda _m: None)


class SlowingModel(FakeModel):
    """Cached runs become far slower than the uncached runs the plan was sized on, as when
    other work takes the cores mid-run."""

    def __call__(self, cfg, items):
        if cfg is not None:
            time.sleep(0.08 * len(items))
        return super().__call__(cfg, items)


def test_a_first_rung_the_time_cuts_short_still_gives_presets():
    items = [(f"p{i}", 0) for i in range(12)]
    lines: list[str] = []
    res = tune_with(SlowingModel(), items, minutes=0.1, steps=20, meta={"model": "fake"}, batch=2,
                    progress=lines.append)
    assert any("the time is up during rung 1; the settings it measured decide" in ln for ln in lines), lines
    plan = res.meta["plan"]
    measured = [c for c in res.candidates if len(c.items) >= plan["rungs"][0]]
    assert 0 < len(measured) < plan["start"] + 3  # only part of the planned rung was measured
    assert set(res.picks) == {"quality", "balanced", "fast"}
    assert all(res.by_key(k) in measured for k in res.picks.values())


def test_memory_cap_keeps_picks_within_it(tmp_path):
    items = [(f"p{i}", 0) for i in range(6)]
    res = tune_with(FakeModel(), items, minutes=0.15, steps=20, memory_cap_bytes=500, meta={"model": "fake"},
                    progress=lambda _m: None)
    assert res.picks and all(res.by_key(k).cache_bytes <= 500 for k in res.picks.values())


# ---------------------------------------------------------------------------- bad input
def _bad(tmp_path, **kw):
    with pytest.raises(TuneInputError) as err:
        tune_model(**{"minutes": 1.0, "out": tmp_path / "out" / "t.yaml", **kw})
    return str(err.value)


def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path):
    (tmp_path / "out").mkdir()
    assert "unknown model 'nope'; the registry has shapes" in _bad(tmp_path, model="nope")
    assert "--minutes: must be more than 0, got 0" in _bad(tmp_path, minutes=0)
    assert "--prompts: cannot read" in _bad(tmp_path, prompts=tmp_path / "missing.txt")
    assert "--prompts: cannot read" in _bad(tmp_path, prompts=tmp_path)  # a folder
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    assert "holds no prompts" in _bad(tmp_path, prompts=tmp_path / "empty.txt")
    assert "--seeds" in _bad(tmp_path, seeds=0)
    assert "must end in .yaml" in _bad(tmp_path, out=tmp_path / "out" / "t.txt")
    assert "does not exist" in _bad(tmp_path, out=tmp_path / "nowhere" / "t.yaml")
    noop = tmp_path / "noop.yaml"
    noop.write_text("models:\n  - {name: noop, kind: noop}\n")
    assert "nothing to tune" in _bad(tmp_path, model="noop", models_file=str(noop))
    assert list((tmp_path / "out").iterdir()) == []
    # the command says the same, without a traceback
    res = subprocess.run([sys.executable, "-m", "service.cli", "tune", "nope", "--minutes", "0",
                          "--out", str(tmp_path / "out" / "t.yaml")], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode != 0 and res.stderr.strip().startswith("clusca tune: --minutes: must be more than 0")
    assert "Traceback" not in res.stderr and list((tmp_path / "out").iterdir()) == []


def test_bad_adapters_are_a_clear_error_and_write_nothing(tmp_path, monkeypatch):
    from tests.support import write_lora

    (tmp_path / "out").mkdir()
    models = tmp_path / "models.yaml"
    models.write_text(SHORT_BUILTIN)
    assert "--adapter: 'ink:big' is not NAME[:SCALE]" in _bad(tmp_path, adapters=["ink:big"])
    assert "--adapter: '../x' is not NAME[:SCALE]" in _bad(tmp_path, adapters=["../x"])
    assert "is named twice" in _bad(tmp_path, adapters=["ink", "ink:0.5"])
    store = tmp_path / "adapters"
    write_lora(store / "shapes" / "misfit.safetensors", {"transformer_blocks.0.attn.to_q": (7, 192)})
    monkeypatch.setenv("CLUSCA_ADAPTERS_DIR", str(store))
    unknown = _bad(tmp_path, adapters=["ink"], models_file=str(models))
    assert "has no adapter 'ink'" in unknown and "CLUSCA_ADAPTERS_DIR" in unknown
    assert "adapter 'misfit' cannot be used: layer" in _bad(tmp_path, adapters=["misfit"], models_file=str(models))
    assert list((tmp_path / "out").iterdir()) == []


def test_tuning_with_an_adapter_runs_it_on_every_image_and_says_so(tmp_path, monkeypatch, one_torch_thread):
    import torch

    from service.cli.tune import _apply_adapters, _load_pipeline
    from tests.support import linear_shapes, write_lora

    models = tmp_path / "models.yaml"
    models.write_text(SHORT_BUILTIN)
    entry = Registry.load(models).get("shapes")
    pipe, _ = _load_pipeline(entry, "cpu")
    store = tmp_path / "adapters"
    write_lora(store / "shapes" / "ink.safetensors", linear_shapes(pipe.transformer), scale=1.0)
    monkeypatch.setenv("CLUSCA_ADAPTERS_DIR", str(store))

    def image():
        out = pipe(prompt=["a red circle"], generator=[torch.Generator().manual_seed(1)], num_inference_steps=4,
                   guidance_scale=5.0, height=32, width=32, output_type="np").images
        return torch.as_tensor(out)

    before = image()
    _apply_adapters(pipe, entry, [("ink", 1.0)])
    assert (image() - before).abs().max() > 0.05  # every call of the pipeline now runs with the adapter
    out = tmp_path / "t.yaml"
    tune_model("shapes", minutes=0.2, out=out, models_file=str(models), adapters=["ink:0.8"], progress=lambda _m: None)
    src = Registry.load(out).get("shapes").defaults.cache_presets_source
    assert src["adapters"] == [{"name": "ink", "scale": 0.8}]


def test_a_partial_run_is_not_overwritten_without_resume(tmp_path):
    out = tmp_path / "t.yaml"
    side_files(out)[0].write_text(json.dumps({"complete": False, "candidates": []}))
    assert "pass --resume" in _bad(tmp_path, out=out)


# ---------------------------------------------------------------------------- end to end
def test_tune_builtin_then_serve_the_tuned_presets(tmp_path, one_torch_thread):
    models = tmp_path / "models.yaml"
    models.write_text(SHORT_BUILTIN)
    out = tmp_path / "shapes-tuned.yaml"
    lines: list[str] = []
    result = tune_model("shapes", minutes=0.5, out=out, models_file=str(models), progress=lines.append)
    measurements, plot = side_files(out)
    assert out.exists() and measurements.exists() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("rung 1/" in ln for ln in lines) and any("timing" in ln for ln in lines)  # progress shown
    entry = Registry.load(out).get("shapes")  # the registry takes the file as written
    assert entry.defaults.cache_presets == result["presets"] and set(result["presets"]) == {"quality", "balanced",
                                                                                            "fast"}
    src = entry.defaults.cache_presets_source
    assert src["tool"] == "clusca tune" and src["device"].startswith("cpu") and "built-in evaluation set" in src["prompts"]
    assert src["date"].endswith("Z") and src["measurements"] == measurements.name and src["steps"] == 10
    data = json.loads(measurements.read_text())
    assert data["complete"] and data["picks"] and all("psnr" in c for c in data["candidates"])
    assert any("adherence" in c for c in data["candidates"])  # the built-in checker ran
    # every tuned preset is at least as fast as the library's preset of its name, measured alike
    for name, row in result["summary"]["picks"].items():
        lib = result["summary"]["library"][name]
        assert row["wall_speedup"] >= lib["wall_speedup"] or row["wall_speedup"] == max(
            r["wall_speedup"] for r in result["summary"]["picks"].values())

    # CLUSCA_MODELS=FILE clusca serve: the tuned presets are what the service runs and shows
    with clusca_serve(tmp_path, {"CLUSCA_MODELS": str(out), "OMP_NUM_THREADS": "1"}, timeout=120) as served:
        url = served.url
        shown = httpx.get(url + "/models").json()["models"][0]
        assert shown["name"] == "shapes" and shown["defaults"]["cache_presets"] == result["presets"]
        assert shown["defaults"]["cache_presets_source"]["date"] == src["date"]
        assert shown["defaults"]["cache_presets_source"]["device"] == src["device"]
        r = httpx.post(url + "/generate", json={"prompt": "a red circle", "seed": 1, "cache": {"preset": "fast"}},
                       timeout=120)
        assert r.status_code == 200, r.text
        ran = r.json()["cache"]
        want = ClusCaConfig.from_dict({"preset": "fast", **result["presets"]["fast"]}).to_dict()
        assert {k: ran[k] for k in want if k in ran} == {k: v for k, v in want.items() if k in ran}


def test_tune_runs_on_a_tiny_random_flux_pipeline(tmp_path, one_torch_thread):
    pytest.importorskip("transformers")
    from tests.worker.test_service_diffusers import SEQ, build_tiny_flux

    build_tiny_flux(tmp_path / "pipe")
    models = tmp_path / "models.yaml"
    models.write_text(
        "models:\n  - name: tinyflux\n    kind: diffusers\n    pipeline_class: FluxPipeline\n"
        f"    path: {tmp_path / 'pipe'}\n"
        "    defaults: {width: 32, height: 32, steps: 12, guidance: 3.5, cache: balanced, size_multiple: 16}\n"
        f"    options: {{call_kwargs: {{max_sequence_length: {SEQ}}}}}\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n# a comment\n\na blue square on the left\ntwo green triangles\n")
    out = tmp_path / "flux.json"
    result = tune_model("tinyflux", minutes=0.4, out=out, prompts=prompts, models_file=str(models),
                        progress=lambda _m: None)
    entry = Registry.load(out).get("tinyflux")
    assert entry.kind == "diffusers" and entry.path == str(tmp_path / "pipe")
    assert entry.options == {"call_kwargs": {"max_sequence_length": SEQ}}
    assert entry.defaults.cache_presets == result["presets"]
    assert entry.defaults.cache_presets_source["prompts"] == "prompts.txt (3 prompts)"
    for name in result["presets"]:
        cfg = entry.cache_config({"preset": name})
        assert cfg.mode in ("fora", "taylorseer", "clusca") and label(cfg)
    data = json.loads(side_files(out)[0].read_text())
    assert data["meta"]["model"] == "tinyflux" and data["final"]


def test_interleaved_timing_reads_both_clocks_and_answers_by_the_chosen_one():
    from clusca.tune import interleaved_speedups
    from clusca.tune.timing import pick_clock

    def busy(seconds):
        def run():
            end = time.process_time() + seconds
            while time.process_time() < end:
                pass
        return run

    def napping():  # little CPU, much wall clock: what a loaded machine does to a run
        busy(0.005)()
        time.sleep(0.2)

    runs = {"half": busy(0.01), "napping": napping}
    timing = interleaved_speedups(busy(0.02), runs, rounds=3, clock="cpu")
    assert len(timing.times["cpu"]["half"]) == 3 and len(timing.base["cpu"]) == 3 * 2  # one group of 2, + ends
    cpu, wall = timing.speedups(), timing.speedups("wall")
    assert 1.5 < cpu["half"] < 2.6 and cpu["napping"] > 2.5 and wall["napping"] < cpu["napping"] / 3
    assert pick_clock("cpu", 1) == "cpu" and pick_clock("cpu", 4) == "wall" and pick_clock("cuda:0", 1) == "wall"
    with pytest.raises(ValueError, match="clock"):
        interleaved_speedups(busy(0.001), runs, rounds=1, clock="sundial")


def test_rungs_lean_to_hard_prompts_and_keep_the_settings_near_the_presets_speeds():
    from clusca.tune.ladder import band_of, hard_leaning_order, keep_for_picks

    hardness = {i: -float(i) for i in range(48)}  # item 0 the hardest
    order = hard_leaning_order(hardness, [2, 6, 18, 48])
    assert sorted(order) == list(range(48))
    assert set(order[:2]) <= set(order[:6]) <= set(order[:18])  # each rung adds to the one before
    hardest_sixth = set(range(8))
    assert len(hardest_sixth & set(order[:6])) >= 2 and len(hardest_sixth & set(order[:18])) >= 4
    assert max(order[:6]) >= 24  # still a sample of the whole set, easy prompts included

    # FLOPs speedup, PSNR: a front from 1.5x to 6x; the presets sit at 2.8x to 3.5x
    pts = [(1.5, 50.0), (2.0, 45.0), (2.6, 40.0), (3.2, 36.0), (3.8, 32.0), (4.2, 30.0), (6.0, 20.0)]
    band = band_of([2.8, 3.3, 3.5])
    assert band == pytest.approx((0.85 * 2.8, 1.25 * 3.5))
    assert keep_for_picks(pts, 4, band) == [2, 3, 4, 5]  # not the ends of the front
    assert keep_for_picks(pts, 3, band) == [2, 4, 5]  # a band too full: spread over it
    assert keep_for_picks(pts, 3) == [0, 3, 6]  # without presets: spread over the whole front
    assert keep_for_picks(pts, 6, band) == [0, 2, 3, 4, 5, 6]  # room left: the rest of the front, spread
