"""The queue throughput benchmark renders its sections from its saved results alone."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import queue_throughput, report  # noqa: E402
from benchmarks._results import save  # noqa: E402

# A machine no test host is: every environment fact of a section must come from the results.
META = {"date": "2026-01-01 00:00 UTC", "cores": 7, "machine": "testarch", "python": "3.99.1", "load_avg": 0.5}
CONFIG = {"jobs": 100, "concurrency": 5, "workers": 3, "max_batch": 4, "batch_wait_ms": 2.0}


def _render(res: dict, tmp_path: Path, name: str) -> str:
    docs = tmp_path / "benchmarks.md"
    if not docs.exists():
        docs.write_text("# Benchmarks\n\nkept\n")
    report.main([str(save(res, tmp_path / name)), "--docs", str(docs)])
    return docs.read_text()


def test_plain_section_comes_from_the_saved_rows(tmp_path):
    res = {"mode": "plain", "meta": META, "config": CONFIG,
           "rows": [{"path": "queue", "jobs": 100, "seconds": 0.25, "cpu_share": {"redis": 0.1}},
                    {"path": "http-sync", "jobs": 100, "seconds": 0.8, "cpu_share": {"redis": 0.1}}]}
    text = _render(res, tmp_path, "queue_throughput.json")
    assert "kept" in text
    assert ("`python benchmarks/queue_throughput.py --jobs 100 --concurrency 5 --workers 3 --max-batch 4` on 7 CPU "
            "core(s), testarch, Python 3.99.1. Redis, the API process, 3 worker process(es)") in text
    assert "| queue | 100 | 0.25 | 400 | >= 200 met |" in text and "| http-sync | 100 | 0.80 | 125 | >= 200 MISSED |" in text
    assert not queue_throughput.targets_met(res)
    again = _render(res, tmp_path, "queue_throughput.json")
    assert again == text


def test_each_comparison_owns_its_section_and_reports_per_round_ratios(tmp_path):
    cmp = {"mode": "compare", "compare": "sentinel:sentinel+wait", "meta": META, "config": {**CONFIG, "rounds": 3},
           "rates": {"sentinel": [400.0, 500.0, 600.0], "sentinel+wait": [200.0, 450.0, 300.0]},
           "latency_s": {"sentinel": [0.010, 0.020, 0.030], "sentinel+wait": [0.030, 0.020, 0.060]}}
    name = queue_throughput.default_json(cmp).name
    assert name == "queue_throughput-sentinel-vs-sentinel-wait.json" and report.benchmark_of(Path(name)) == "queue_throughput"
    text = _render(cmp, tmp_path, name)
    start, end = queue_throughput.compare_markers("sentinel:sentinel+wait")
    assert text.count(start) == 1 and text.count(end) == 1
    assert "`python benchmarks/queue_throughput.py --compare sentinel:sentinel+wait --jobs 100 --concurrency 5 " \
           "--rounds 3` on 7 CPU core(s), testarch" in text
    assert "| sentinel | 500 | 400, 500, 600 | 20.00 |" in text and "| sentinel+wait | 300 | 200, 450, 300 | 30.00 |" in text
    # Ratios per round 0.5, 0.9, 0.5 and 3, 1, 2: their medians, not the ratio of the medians (0.6, 1.5).
    assert "sentinel+wait / sentinel: throughput **x0.50**, time to 202 **x2.00**" in text
    # A plain run beside it leaves the comparison's section alone.
    plain = {"mode": "plain", "meta": META, "config": CONFIG,
             "rows": [{"path": "queue", "jobs": 100, "seconds": 0.5, "cpu_share": {}}]}
    both = _render(plain, tmp_path, "queue_throughput.json")
    assert "throughput **x0.50**" in both and "| queue | 100 | 0.50 | 200 | >= 200 met |" in both


def test_readme_quotes_the_saved_plain_run():
    from benchmarks._results import RESULTS, load

    res = load(RESULTS / "queue_throughput.json")
    rate = {row["path"]: row["jobs"] / row["seconds"] for row in res["rows"]}
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| queue throughput"))
    assert (f"{rate['queue']:.0f} jobs/s queue, {rate['http-async']:.0f} jobs/s HTTP async, "
            f"{rate['http-sync']:.0f} jobs/s HTTP sync") in row
