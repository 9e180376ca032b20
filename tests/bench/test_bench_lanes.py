"""benchmarks/lanes_latency.py renders its section and headline from the raw latencies alone."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import lanes_latency  # noqa: E402


def _res() -> dict:
    meta = {"argv": "--short-jobs 3", "date": "2026-01-01 00:00 UTC", "cores": 2, "machine": "x86_64", "load_avg": 1.0,
            "step_delay_s": 0.02, "side": 16, "long_jobs": 2, "long_steps": 200, "short_jobs": 3, "short_steps": 5,
            "short_every_s": 0.25}
    setups = [{"name": name, "long_cost": 26240 if lanes else None, "workers": workers, "long_s": [4.0, 8.0],
               "short_s": short}
              for (name, lanes, workers), short in zip(lanes_latency.SETUPS, ([6.0, 8.0, 7.0], [3.0, 4.0, 3.5],
                                                                             [0.1, 0.3, 0.2]))]
    return {"meta": meta, "setups": setups}


def test_the_ratio_and_headline_compare_short_job_medians():
    res = _res()
    assert lanes_latency.ratio(res) == 7.0 / 0.2
    (row,) = lanes_latency.headline(res)
    assert row.figure == "7.00 s against **0.20 s**, x35"
    assert (row.on, row.date) == ("CPU x86_64, 2 cores, load 1.0", "2026-01-01")
    assert lanes_latency.TOPIC == "service"
    assert lanes_latency.p90([1.0, 2.0, 3.0]) == 2.8


def test_write_docs_replaces_only_its_own_section(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nother text\n")
    lanes_latency.write_docs(_res(), path=doc)
    once = doc.read_text()
    assert once.startswith("# Benchmarks\n\nother text\n")
    assert "Written by `python benchmarks/lanes_latency.py --short-jobs 3` on 2026-01-01 00:00 UTC" in once
    assert "| lanes, 2 workers (1 short-only) | 0.20 | 0.28 | 6.00 |" in once
    lanes_latency.write_docs(_res(), path=doc)
    assert doc.read_text() == once
