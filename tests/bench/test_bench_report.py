"""Benchmarks measure, save raw JSON, and render their docs sections from it alone."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import report, service_overhead  # noqa: E402
from benchmarks._results import RESULTS, load, save  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"


def test_every_saved_result_reproduces_its_section_of_the_docs(tmp_path):
    # The committed sections are exactly what their committed raw results render to: a number in
    # docs/benchmarks.md changes only with the measurement behind it.
    docs = tmp_path / "benchmarks.md"
    shutil.copy(DOCS, docs)
    files = sorted(RESULTS.glob("*.json"))
    assert {report.benchmark_of(f) for f in files} >= {"cache_compare", "gpu_flux", "load", "service_overhead",
                                                        "speed_flux", "queue_throughput", "video_transformer",
                                                        "video_caches", "cached_step"}
    assert report.main([*map(str, files), "--docs", str(docs)]) == 0
    assert docs.read_text() == DOCS.read_text()


def test_report_refuses_a_file_no_benchmark_renders(tmp_path):
    stray = save({"x": 1}, tmp_path / "nosuch-run.json")
    with pytest.raises(SystemExit, match="no benchmark named 'nosuch'"):
        report.render_file(stray, tmp_path / "b.md")


def test_saved_results_have_no_nan(tmp_path):
    # JSON has no NaN: a value that was not measured is saved as null.
    path = save({"a": [1.0, float("nan")], "b": {"c": float("inf")}}, tmp_path / "deep" / "t.json")
    assert json.loads(path.read_text()) == {"a": [1.0, None], "b": {"c": None}}
    assert load(path) == {"a": [1.0, None], "b": {"c": None}}


def _overhead_run(direct_ms: float, extra_ms: float, around_ms: float, n: int = 5) -> dict:
    """Raw timings of one run: every service request ``extra_ms`` slower than its direct call,
    ``around_ms`` of that outside the worker's pipeline call."""
    d = [(direct_ms + i) / 1000 for i in range(n)]
    s = [x + extra_ms / 1000 for x in d]
    return {"direct": d, "service": s, "inference": [x - around_ms / 1000 for x in s],
            "queue_wait": [0.0005] * n, "noop_direct": [0.0001] * n, "noop_service": [0.0036] * n}


def test_overhead_report_takes_the_median_over_runs(tmp_path):
    res = {"meta": {"argv": "--requests 5 --runs 3", "date": "2026-01-01 00:00 UTC", "cores": 2, "machine": "x86_64",
                    "torch": "2.x", "threads": 1, "load_avg": 0.5, "steps": 40, "requests": 5},
           "runs": [_overhead_run(380, 4.0, 5.0), _overhead_run(390, 20.0, 6.0), _overhead_run(385, 9.0, 5.5)]}
    save(res, tmp_path / "service_overhead.json")
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nbefore\n")
    report.main([str(tmp_path / "service_overhead.json"), "--docs", str(docs)])
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nbefore\n") and service_overhead.START in text
    assert "Latency over all 15 requests of the 3 run(s):" in text
    # The middle run's, not the mean (+11) nor the pooled medians' difference.
    assert "median over the runs of each run's difference of medians: +9.0 ms" in text
    assert "target <= +15 ms: met (1 of 3 runs above it)" in text
    assert "and 5.5 ms per request around it" in text
    assert "| built-in model, direct pipeline call | 387.0 |" in text
    assert "| 2 | 392.0 | 412.0 | +20.0 | +20.0 | +14.0 | 6.0 | 3.50 |" in text
    # Rendering again from the same file changes nothing.
    before = docs.read_text()
    report.main([str(tmp_path / "service_overhead.json"), "--docs", str(docs)])
    assert docs.read_text() == before


def test_gpu_results_of_two_commands_merge_into_one_table(tmp_path):
    from benchmarks.gpu_flux import merge, render

    info = {"command": "python benchmarks/gpu_flux.py --batches 1", "device": "GPU X", "torch": "t", "dtype": "bf16",
            "steps": 50, "params": 12e9, "tokens": [4096, 512]}
    run = {"peak_extra_bytes": 0, "cache_bytes": 0, "flops_speedup": None, "finite": True, "rel_l2": 0.0, "round": 1}
    one = {"info": info, "results": [{**run, "method": "uncached", "batch": 1, "seconds": 8.0}]}
    four = {"info": {**info, "command": "python benchmarks/gpu_flux.py --batches 4"},
            "results": [{**run, "method": "uncached", "batch": 4, "seconds": 32.0}]}
    text = render(merge([one, four]))
    assert "`python benchmarks/gpu_flux.py --batches 1` and `python benchmarks/gpu_flux.py --batches 4`" in text
    assert "| 1 | uncached | 1 | 8.00 |" in text and "| 4 | uncached | 1 | 8.00 |" in text


def test_every_benchmark_renders_its_sections_with_write_docs():
    import importlib

    names = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_") and p.stem != "report"}
    for name in sorted(names):
        module = importlib.import_module(f"benchmarks.{name}")
        assert callable(getattr(module, "write_docs", None)), f"benchmarks/{name}.py has no write_docs(results)"
        # A section of the docs is written through write_docs only, never straight from a measurement.
        src = (ROOT / "benchmarks" / f"{name}.py").read_text()
        assert src.count("write_section(") <= 1 + src.count("def write_docs"), name


def test_the_quoted_command_leaves_out_where_results_and_docs_went():
    from benchmarks._results import quoted_command

    argv = ["--runs", "3", "--json", "/tmp/r.json", "--no-write", "--from-json=x.json", "--docs", "--steps", "4"]
    assert quoted_command(argv) == ["--runs", "3", "--docs", "--steps", "4"]
    # An option whose value is optional drops only a value that follows it.
    assert quoted_command(argv, paths=("--json", "--docs")) == ["--runs", "3", "--from-json=x.json", "--steps", "4"]
    assert quoted_command(["--docs", "/tmp/b.md", "--x"], paths=("--docs",)) == ["--x"]


def test_readme_quotes_the_saved_video_transformer_run():
    res = load(RESULTS / "video_transformer.json")
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| cache presets on video"))
    assert f"{res['tokens']} spatio-temporal tokens" in row and f"load average {res['load_avg']:.1f}" in row
    for r in res["rows"][1:]:
        assert f"{r['flops_speedup']:.2f}x / {r['wall_speedup']:.2f}x / {r['cpu_speedup']:.2f}x" in row, r["name"]


def test_readme_quotes_the_saved_cached_step_run():
    import statistics

    res = load(RESULTS / "cached_step.json")
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| cached step at FLUX"))
    lean = {r["method"]: r for r in res["rows"] if r["lean"]}
    hooks = {r["method"]: r for r in res["rows"] if not r["lean"]}
    ops = f"ClusCa `fast` {lean['clusca']['cached']:.0f}, TaylorSeer {lean['taylorseer']['cached']:.0f}, " \
          f"FORA {lean['fora']['cached']:.0f} (module hooks alone: " + \
          " / ".join(f"{hooks[m]['cached']:.0f}" for m in ("clusca", "taylorseer", "fora")) + ")"
    assert ops in row and f"load {res['meta']['load_avg']:.1f}" in row
    for name, method in (("ClusCa `fast`", "clusca"), ("TaylorSeer", "taylorseer"), ("FORA", "fora")):
        r = lean[method]
        wall, cpu = (statistics.median(r[k]) / r["flops_speedup"] for k in ("ratios", "cpu_ratios"))
        assert f"{name} {wall:.3f} / {cpu:.3f}" in row, name
