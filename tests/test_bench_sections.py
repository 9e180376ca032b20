"""Each benchmark's docs section is rendered from its results dict alone.

Every results dict here is synthetic, with values no real run would give (a 7-core
``testarch`` machine, round numbers), so a section that read anything but its results
(the host, a default, a module constant where a measured value belongs) fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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
