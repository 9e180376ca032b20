"""Each benchmark's docs section is rendered from its results dict alone.

Every results dict here is synthetic, with values no real run would give (a 7-core
``testarch`` machine, round numbers), so a section that read anything but its results
(the host, a default, a module constant where a measured value belongs) fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks._results import save  # noqa: E402


def render_via_report(res: dict, tmp_path: Path, name: str) -> str:
    """``res`` saved as ``name`` and rendered by report.py into a docs file that has other text."""
    docs = tmp_path / "benchmarks.md"
    if not docs.exists():
        docs.write_text("# Benchmarks\n\nkept\n")
    report.main([str(save(res, tmp_path / name)), "--docs", str(docs)])
    text = docs.read_text()
    assert "kept" in text
    report.main([str(tmp_path / name), "--docs", str(docs)])
    assert docs.read_text() == text, "rendering the same results twice changed the section"
    return text


def _cached_step_row(method: str, lean: bool, cached: float, flops: float, ratios: list[float]) -> dict:
    return {"method": method, "lean": lean, "full": 5000.0, "cached": cached, "lean_steps": 40, "cached_steps": 40,
            "flops_speedup": flops, "ratios": ratios, "cpu_ratios": [r / 2 for r in ratios],
            "cached_ms": [1.0, 3.0, 2.0], "full_ms": [70.0, 90.0, 80.0], "plain_ms": [60.0, 62.0, 64.0]}


def test_cached_step_section(tmp_path):
    rows = [_cached_step_row("clusca", True, 300, 5.0, [4.0, 4.5, 5.0]),
            _cached_step_row("taylorseer", True, 260, 4.0, [3.0, 3.2, 3.4]),
            _cached_step_row("fora", True, 100, 4.0, [3.8, 3.9, 4.0]),
            _cached_step_row("clusca", False, 900, 5.0, [3.0, 3.5, 4.0])]
    res = {"meta": {"argv": "--runs 3", "date": "2026-01-01 00:00 UTC", "cores": 7, "machine": "testarch",
                    "torch": "t", "threads": 1, "load_avg": 3.5, "steps": 40, "runs": 3, "preset": "balanced",
                    "lockstep": True},
           "uncached_ops": 4321, "rows": rows}
    text = render_via_report(res, tmp_path, "cached_step.json")
    assert "`python benchmarks/cached_step.py --runs 3`" in text
    assert "40 steps, preset `balanced`" in text and "(an uncached step: 4321)" in text
    assert "median of 3 rounds of one whole run each, alternating which goes first (steps in lockstep)" in text
    assert "an uncached step: 62.00 ms" in text and "The 7 cores were shared with other work" in text
    assert "load average 3.5 when it began" in text
    assert "| clusca | lean | 300 | 5000 | 2.00 | 80.00 | 5.00x | 4.50x | 0.900 | 2.25x | 0.450 |" in text
    assert "| clusca | module hooks | 900 | 5000 | 2.00 | 80.00 | 5.00x | 3.50x | 0.700 | 1.75x | 0.350 |" in text
    assert ("Targets: clusca aten ops per cached step <= 400: met; taylorseer aten ops per cached step <= 250: "
            "not met; fora aten ops per cached step <= 250: met; clusca wall / FLOPs >= 0.85: met") in text


def _video_row(name: str, flops: float, wall: float, cpu: float) -> dict:
    return {"name": name, "config": f"setting of {name}", "seconds": 12.34, "wall_speedup": wall, "cpu_speedup": cpu,
            "flops_speedup": flops, "full_steps": 4, "cached_steps": 6, "token_fraction": 0.5, "rel_error": 0.01234,
            "times": [12.3, 12.4]}


def test_video_transformer_section(tmp_path):
    from benchmarks import video_transformer

    res = {"argv": "--transformer --frames 9 --docs", "cores": 7, "date": "2026-01-01 00:00 UTC", "frames": 9,
           "width": 96, "height": 64, "latent": [3, 8, 12], "tokens": 72, "dim": 128, "layers": 3, "steps": 10,
           "repeats": 2, "threads": 1, "params_M": 1.5, "device": "cpu (testarch)", "load_avg": 6.25,
           "rows": [_video_row("uncached", 1.0, 1.0, 1.0), _video_row("ClusCa fast", 4.0, 3.0, 2.0)]}
    text = render_via_report(res, tmp_path, "video_transformer.json")
    start, end = video_transformer.MARKERS
    assert text.count(start) == 1 and text.count(end) == 1
    assert "`nice -n 19 python benchmarks/video_caches.py --transformer --frames 9 --docs`" in text
    assert "(128 wide, 3 blocks, 1.5M parameters" in text and "1 torch thread(s) on cpu (testarch)" in text
    assert "**72 spatio-temporal tokens**" in text and "on this shared 7-core machine; 10 steps" in text
    assert "medians over 2 rounds" in text and "(load average 6.2 at the end)" in text
    assert ("| ClusCa fast | setting of ClusCa fast | 12.3 | 4.00 | 3.00 | 2.00 | 0.50 | 4 / 6 | 0.500 | 0.0123 |"
            in text)


def _measures(n: int, adherence: float, judged: int) -> dict:
    return {"n": n, "adherence": adherence, "colour": 90.0, "count": 80.0, "shape": 70.0, "position": 60.0,
            "judged": judged, "clean": 55.5, "outline": 0.8, "roughness": 1.1, "stray_px": 2.5, "touches_frame": 10.0}


def _checked(adherence: float) -> dict:
    out = _measures(10, adherence, 8)
    out["forms"] = {"one_placed": _measures(6, 100.0, 6), "relation": _measures(4, 25.0, 0)}
    out["groups"] = {"one_object": _measures(6, 100.0, 6), "relation": _measures(4, 25.0, 0)}
    out["adherence_per_seed"] = [adherence - 1, adherence + 1]
    return out


def test_builtin_model_section(tmp_path):
    res = {"argv": "-n 10 --seeds 2", "date": "2026-01-01 00:00 UTC", "cores": 7, "preset": "quality",
           "cpu": "testarch", "threads": 3, "params_M": 1.23, "steps": 12, "guidance": 4.5, "n_prompts": 10, "seeds": 2,
           "seed": 5, "size": "16x16", "import_s": 1.5, "load_s": 0.25, "latency_s": 0.75, "latency_cpu_s": 0.4,
           "load_avg_1min": 6.5, "uncached": _checked(70.0), "eval_s": 3.0,
           "clusca": {"preset": "quality", "config": {"mode": "clusca", "interval": 3, "order": 0, "clusters": 4,
                                                      "gamma": 0.0},
                      "summary": _checked(68.5), "adherence_drop": 1.5, "psnr_db": 33.3, "ssim": 0.9123,
                      "latency_s": 0.3, "latency_cpu_s": 0.2,
                      "stats_first_batch": {"full_steps": 5, "cached_steps": 7, "token_fraction": 0.4,
                                            "flops_speedup": 2.5}}}
    text = render_via_report(res, tmp_path, "builtin_model.json")
    assert "Written by `python benchmarks/builtin_model.py -n 10 --seeds 2` on 2026-01-01 00:00 UTC; CPU `testarch`, " \
           "3 torch thread(s)" in text
    assert "Model: 1.23M parameters, 12 Euler steps, guidance 4.5" in text and "eval_set(10)" in text
    assert "generator seed 5 + r x 100000 + i" in text and "the `quality` preset as the service runs it" in text
    assert "| all right, one object, with or without a position, uncached | >= 97% | 100.0% | yes |" in text
    assert "| all right, two objects in a relation, uncached | >= 80% | 25.0% | NO |" in text
    assert "| one 16x16 image, batch 1, 12 steps, uncached | <= 0.5 s | 0.75 s wall, 0.4 s CPU on 3 thread(s) | yes |" in text
    assert "| relation | 4 | 25.0 | 90.0 | 80.0 | 70.0 | 60.0 | 25.0 | 0 | - | - | - | - | - | - |" in text
    assert "Uncached all right per seed round: 69.0 / 71.0%." in text
    assert "PSNR 33.3 dB, SSIM 0.9123" in text and "flops_speedup=2.5" in text
    assert "1-minute load average during the run: 6.5 on 7 cores" in text
    # The service's own thread count (one per core) is timed too, and can alone meet the target.
    res.update(latency_s=0.9, latency_cpu_s=0.8, latency_all_cores_s=0.45)
    text = render_via_report(res, tmp_path, "builtin_model.json")
    assert ("| one 16x16 image, batch 1, 12 steps, uncached | <= 0.5 s | 0.9 s wall, 0.8 s CPU on 3 thread(s); "
            "0.45 s wall on 7 threads (the service's default) | yes |") in text


def test_tune_section(tmp_path):
    row = {"label": "fora N3 W3", "psnr": 30.0, "ssim": 0.9, "adherence": 50.0, "speedup": 2.5, "wall_clock_speedup": 2.4}
    rows = {"uncached": {"adherence": 43.75}, "tuned fast": row,
            "paper fast": {**row, "label": "clusca N6", "psnr": 20.0, "speedup": 2.0}}
    res = {"minutes": 1.5, "holdout": 8, "rounds": 4, "cores": 7, "date": "2026-01-01 00:00 UTC", "tune_s": 88.4,
           "plan": {"rungs": [2, 6]}, "final_prompts": 6, "all_rungs": [2, 6], "candidates": 11,
           "images_measured": 77, "presets": {"fast": {"mode": "fora", "interval": 3}}, "rows": rows,
           "targets": [["tuned fast dominates paper fast", "30.00 vs 20.00 dB", True], ["another", "x", False]],
           "device": "cpu testarch (7 cores)", "clock": "wall", "group": 5}
    text = render_via_report(res, tmp_path, "tune_builtin.json")
    assert "Written by `python benchmarks/tune_builtin.py --minutes 1.5` on 2026-01-01 00:00 UTC; " \
           "cpu testarch (7 cores), shared with other work. The tuner ran 88 s: 11 settings, 77 candidate images, " \
           "rungs of 2, 6 image(s)" in text
    assert "on 8 held-out prompts (`eval_set(8, seed=7)`" in text and "batch 1, 4 interleaved rounds" in text
    assert "an uncached run between every 5 settings" in text and "The machine's 7 cores were shared" in text
    assert "| tuned fast dominates paper fast | 30.00 vs 20.00 dB | yes |" in text and "| another | x | no |" in text
    assert "| uncached | - | - | 43.8 | 1.00 | 1.00 |" in text
    assert "| tuned fast (fora N3 W3) | 30.00 | 0.9000 | 50.0 | 2.50 | 2.40 |" in text
    assert 'Tuned `cache_presets`: `{"fast": {"mode": "fora", "interval": 3}}`.' in text


def _preset(seconds: float, flops: float | None, fraction: float | None, cached: int, psnr: float) -> dict:
    return {"seconds_per_frame": seconds, "flops_speedup": flops, "token_fraction": fraction, "cached_steps": cached,
            "psnr": psnr, "ssim": 0.95}


def test_video_pipeline_section_per_model(tmp_path):
    from benchmarks import video_caches

    res = {"meta": {"argv": "--model wan-test --docs", "date": "2026-01-01 00:00 UTC", "cores": 7,
                    "machine": "testarch", "device": "cuda", "load_avg": 0.2},
           "model": "wan-test", "frames": 9, "steps": 12, "size": "96x64", "prompts": 3, "repeats": 4,
           "presets": {"off": _preset(0.5, None, None, 0, 100.0), "fast": _preset(0.125, 3.5, 0.25, 9, 31.25)}}
    name = video_caches.default_json(res).name
    assert name == "video_caches-wan-test.json"
    text = render_via_report(res, tmp_path, name)
    start, end = video_caches.markers("wan-test")
    assert text.count(start) == 1 and text.count(end) == 1
    assert "`python benchmarks/video_caches.py --model wan-test --docs`" in text
    assert "one batch of 3 prompt(s) per call, device `cuda`) on 7 CPU core(s), testarch: 9 frames of 96x64, 12 steps" in text
    assert "the median of 4 timed rounds" in text and "tiny and random" not in text and "load average" not in text
    assert "| off | 0.5000 | 1.00x | 1.000 | 0 | 100.00 | 0.9500 |" in text
    assert "| fast | 0.1250 | 3.50x | 0.250 | 9 | 31.25 | 0.9500 |" in text
    # A tiny pipeline on a busy machine says both.
    busy = {**res, "model": "tiny-wan", "meta": {**res["meta"], "load_avg": 5.5}}
    text = render_via_report(busy, tmp_path, "video_caches-tiny-wan.json")
    assert "its quality figures mean nothing" in text and "1-minute load average 5.5 when the run began" in text
