"""The adapter benchmark's docs section, targets and headline rows come from its results dict alone."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import adapters  # noqa: E402
from tests.bench.test_bench_sections import render_via_report  # noqa: E402


def _quality(adherence: float, outline: float, pastel: float) -> dict:
    return {"adherence": adherence, "groups": {"one_object": 97.5, "relation": 88.25, "count": 77.0},
            "styles": {"outline": outline, "pastel": pastel}}


RES = {"argv": "-n 12 --rounds 3", "date": "2031-02-03 04:05 UTC", "cpu": "testarch", "cores": 7, "threads": 1,
       "torch": "9.9", "load_avg_1min": 2.5, "n_prompts": 12, "seed": 0, "preset": "zed", "rounds": 3,
       "overhead_rank": 16, "steps": 17, "guidance": 4.5, "size": "24x24",
       "adapters": {"outline": {"rank": 8, "alpha": 8.0, "layers": 30, "bytes": 1, "file_bytes": 3072},
                    "pastel": {"rank": 4, "alpha": 2.0, "layers": 30, "bytes": 1, "file_bytes": 2048}},
       "quality": {"uncached": {"none": _quality(98.0, 0.0, 1.0), "outline": _quality(96.0, 95.0, 0.0),
                                "pastel": _quality(94.5, 0.0, 89.0)},
                   "cached": {"none": _quality(97.0, 0.0, 0.0), "outline": _quality(95.0, 91.0, 0.0),
                              "pastel": _quality(96.0, 2.0, 93.0)}},
       "mixed": {"batch": 8, "none_s": [1.0, 1.0, 1.0], "one_s": [2.0, 2.0, 4.0], "mixed_s": [2.5, 2.5, 0.5]},
       "builtin_overhead": {"uncached": {"no_bank_s": [1.0, 1.0, 1.0], "idle_bank_s": [1.0, 1.01, 1.02],
                                         "adapter_s": [1.25, 1.25, 9.0]},
                            "cached": {"no_bank_s": [0.5, 0.5, 0.5], "idle_bank_s": [0.5, 0.5, 0.5],
                                       "adapter_s": [0.55, 0.55, 0.55]}},
       "proxy_overhead": {"params": 77_000_000, "width": 320, "dual": 3, "single": 5, "image_tokens": 99,
                          "text_tokens": 11, "layers": 40, "no_bank_s": [2.0, 2.0, 2.0], "idle_bank_s": [2.0, 2.0, 2.0],
                          "adapter_s": [2.1, 2.1, 2.1]}}


def test_section_targets_and_headline_are_rendered_from_the_results(tmp_path):
    text = render_via_report(RES, tmp_path, "adapters.json")
    for s in ("`python benchmarks/adapters.py -n 12 --rounds 3`", "2031-02-03", "testarch", "7 cores",
              "`outline` (rank 8, alpha 8, 30 linears, 3 KiB)", "`pastel` (rank 4, alpha 2, 30 linears, 2 KiB)",
              "first 12 prompts", "17 steps, guidance 4.5", "`zed` preset",
              "| pastel | uncached | 94.5% | -3.50 | 0.0% | **89.0%** | 97.5% | 88.25% | 77.0% |",
              "| outline | cached | 95.0% | -2.00 | **91.0%** | 0.0% | 97.5% | 88.25% | 77.0% |",
              "| built-in (24x24) | one image, 17 steps, batch 1, uncached | 1.000 s | 1.010 s | 1.250 s | +25.0% |",
              "| FLUX proxy (77M, 3 + 5 blocks, width 320) | one transformer call, 99 + 11 tokens, batch 1 | 2.000 s | "
              "2.000 s | 2.100 s | +5.0% |",
              "all with one adapter 2.000 s, half with each adapter 2.500 s (1.25x)"):
        assert s in text, s
    # The pastel adapter misses both of its uncached targets; every other target is met.
    assert ("pastel shows its style in >= 90% (uncached): not met; pastel costs <= 3 adherence points (uncached): "
            "not met") in text
    assert "outline shows its style in >= 90% (cached): met" in text and text.count("not met") == 2
    style, cost = adapters.headline(RES)
    assert {style.date, cost.date} == {"2031-02-03"} and "testarch" in style.on
    assert "`outline` **95.0%** its style, adherence -2.00 points (cached 91.0%, -2.00)" in style.figure
    assert "built-in +25.0%, FLUX proxy +5.0%; mixed batch of 8 1.25x" in cost.figure


def test_alternating_rotates_the_order_and_times_every_variant():
    calls = []
    times = adapters.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(v) for v in times.values()] == [3, 3] and all(t >= 0 for v in times.values() for t in v)
