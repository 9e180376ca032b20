"""benchmarks/adapters_service.py renders its section and headline from the raw results alone."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import adapters_service  # noqa: E402


def _res(mixed_jobs_per_s: float = 3.6) -> dict:
    meta = {"argv": "--jobs 16", "date": "2026-01-01 00:00 UTC", "cores": 2, "machine": "x86_64", "load_avg": 1.0,
            "rank": 8, "adapters": 4, "steps": 10, "jobs": 16, "concurrency": 8, "batch": 4, "repeats": 2}
    switch = {"base_s": [0.20, 0.22], "cold_s": [0.30, 0.32], "cold_load_s": [0.010, 0.012],
              "warm_s": [0.21, 0.23], "warm_load_s": [0.0, 0.0], "slots": 4, "layers": 34}
    return {"meta": meta, "switch": switch,
            "one_adapter": {"seconds": 4.0, "jobs": 16, "jobs_per_s": 4.0, "mean_batch": 3.5, "loads": 0},
            "mixed": {"seconds": 16 / mixed_jobs_per_s, "jobs": 16, "jobs_per_s": mixed_jobs_per_s, "mean_batch": 3.4,
                      "loads": 0}}


def test_the_ratio_switch_times_and_headline_come_from_the_results():
    res = _res()
    assert abs(adapters_service.ratio(res) - 0.9) < 1e-9
    assert adapters_service.switch_ms(res) == (11.0, 0.0)
    goal, switch = adapters_service.headline(res)
    assert goal.figure == "**0.90x**" and "goal 0.8x" in goal.what and "concurrency 8" in goal.what
    assert switch.figure == "11.0 ms, 0.00 ms"
    assert (goal.on, goal.date) == ("CPU x86_64, 2 cores, load 1.0", "2026-01-01")
    assert adapters_service.TOPIC == "service"


def test_write_docs_replaces_only_its_own_section_and_says_whether_the_goal_was_met(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nother text\n")
    adapters_service.write_docs(_res(), path=doc)
    once = doc.read_text()
    assert once.startswith("# Benchmarks\n\nother text\n")
    assert "Written by `python benchmarks/adapters_service.py --jobs 16` on 2026-01-01 00:00 UTC" in once
    assert "| cold: load into a slot | 11.0 | 0.310 |" in once and "| 4 adapters in turn | 3.60 | 3.40 |" in once
    assert "(goal 0.8x: met)" in once
    adapters_service.write_docs(_res(), path=doc)
    assert doc.read_text() == once
    adapters_service.write_docs(_res(mixed_jobs_per_s=2.0), path=doc)
    assert "(goal 0.8x: missed)" in doc.read_text()
