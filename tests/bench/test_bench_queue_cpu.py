"""The CPU-per-job benchmark renders its section from its saved rounds alone."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import queue_cpu, report  # noqa: E402
from benchmarks._results import save  # noqa: E402

META = {"date": "2026-01-01 00:00 UTC", "cores": 7, "machine": "testarch", "python": "3.99.1", "load_avg": 0.5}


def _round(rate: float, api: float, worker: float, primaries: float, replicas: float, cmd: tuple) -> dict:
    return {"jobs_per_s": rate, "cpu_ms": {"api": api, "worker": worker, "redis_primaries": primaries,
                                           "redis_replicas": replicas},
            "command_us": {"redis_primaries": cmd[0], "redis_replicas": cmd[1]}}


def test_the_section_gives_medians_per_process_and_the_difference(tmp_path):
    res = {"compare": "single:cluster", "meta": META,
           "config": {"jobs": 100, "concurrency": 5, "rounds": 3, "max_batch": 4, "batch_wait_ms": 2.0},
           "rounds": {"single": [_round(300, 2.0, 1.0, 0.3, 0.0, (250, 0)), _round(200, 3.0, 0.8, 0.2, 0.0, (240, 0)),
                                 _round(250, 2.5, 0.9, 0.25, 0.0, (260, 0))],
                      "cluster": [_round(220, 2.6, 0.9, 0.4, 0.3, (300, 150)), _round(180, 2.4, 1.1, 0.5, 0.2, (280, 170)),
                                  _round(240, 2.5, 1.0, 0.45, 0.25, (290, 160))]}}
    name = queue_cpu.default_json("single:cluster").name
    assert name == "queue_cpu-single-vs-cluster.json" and report.benchmark_of(Path(name)) == "queue_cpu"
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nkept\n")
    report.main([str(save(res, tmp_path / name)), "--docs", str(docs)])
    text = docs.read_text()
    assert "kept" in text and text.count(queue_cpu.markers("single:cluster")[0]) == 1
    assert "`python benchmarks/queue_cpu.py --compare single:cluster --jobs 100 --concurrency 5 --rounds 3` on 7 CPU " \
           "core(s), testarch" in text
    assert "| single | 250 | 2.50 | 0.90 | 0.25 | 0.00 | 3.65 | 250 / 0 |" in text
    assert "| cluster | 220 | 2.50 | 1.00 | 0.45 | 0.25 | 4.20 | 290 / 160 |" in text
    assert "API +0.00, worker +0.10, Redis primaries +0.20, Redis replicas +0.25; in all **x1.15**" in text
    report.main([str(tmp_path / name), "--docs", str(docs)])
    assert docs.read_text() == text
