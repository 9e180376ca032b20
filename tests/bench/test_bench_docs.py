"""Benchmark scripts rewrite only their own section of docs/benchmarks.md."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.speed_flux import write_docs  # noqa: E402


def _result(label: str, flops: float, argv: str, uncached=(10.0, 12.0, 9.0), cached=(2.0, 3.0, 2.0)) -> dict:
    return {
        "meta": {"argv": argv, "label": label, "device": "cpu (x86_64)", "threads": 1},
        "model": {"width": 64, "dual": 1, "single": 1, "params": 1.5e6, "image_tokens": 16, "text_tokens": 4,
                  "dtype": "float32", "steps": 10},
        "config": {"preset": "fast", "mode": "clusca", "interval": 6, "warmup": 3, "order": 1, "clusters": 16,
                   "gamma": 0.007},
        "stats": {"full_steps": 4, "cached_steps": 6, "token_fraction": 0.25, "flops_speedup": flops,
                  "cache_bytes": 3 * 2**20},
        "runs": {"uncached_s": list(uncached), "cached_s": list(cached), "full_step_s": [1.0, 1.2, 1.1],
                 "cached_step_s": [0.01, 0.02, 0.03], "full_step_overhead": [0.01, 0.03, 0.02],
                 "kmeans_share": [0.01, 0.05, 0.02]},
        "rel_error": 0.00123,
    }


def test_speed_section_is_rewritten_in_place_and_keeps_its_neighbours(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- a:start -->\n## A\nkeep me\n<!-- a:end -->\n")
    write_docs(_result("CPU", 4.0, "--runs 5"), path=doc)
    # Hand-written notes after the section and another section below it.
    doc.write_text(doc.read_text() + "\nA note on the CPU run.\n\n## Next\n<!-- b:start -->\nother\n<!-- b:end -->\n")
    write_docs(_result("CPU", 5.0, "--runs 7"), path=doc)
    write_docs(_result("GPU", 3.0, "--device cuda"), path=doc)
    text = doc.read_text()
    assert "keep me" in text and "A note on the CPU run." in text and "other" in text
    assert text.count("## ClusCa speed, FLUX architecture (CPU)") == 1
    assert "| **FLOPs speedup** (analytic) | 5.00x |" in text and "4.00x" not in text and "--runs 7" in text
    assert text.index("(CPU)") < text.index("A note on the CPU run.") < text.index("## Next") < text.index("(GPU)")


def test_speed_section_is_computed_from_the_raw_runs(tmp_path):
    doc = tmp_path / "benchmarks.md"
    write_docs(_result("CPU", 4.0, "--runs 3"), path=doc)
    text = doc.read_text()
    rows = (
        # Per-run ratios 5.00, 4.00, 4.50: their median, not the ratio of the medians (10 / 2).
        "| **wall-clock speedup** (median of per-run ratios) | 4.50x  (runs: 5.00, 4.00, 4.50) |",
        "| wall / FLOPs speedup | 1.125 |",
        "| uncached run (median of 3) | 10.00 s |", "| cached run (median of 3) | 2.00 s |",
        "| full step / cached step (median) | 1100.0 ms / 20.0 ms |",
        "| k-means share of full-step time | 2.00% |", "| cache memory (peak) | 3.0 MiB |",
        "| model | FLUX architecture, random weights, width 64, 1 dual + 1 single blocks, 1.5M params |",
        "Targets: FLOPs speedup >= 4.8x: not met; wall >= 0.9 x FLOPs speedup: met; k-means <= 3% of full steps: met",
    )
    for row in rows:
        assert row in text, row
