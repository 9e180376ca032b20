"""The video cache benchmark runs end to end on a tiny random WanPipeline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.video_caches import main  # noqa: E402


def test_video_benchmark_reports_every_preset(tmp_path, one_torch_thread):
    out = tmp_path / "video.json"
    report = main(["--tiny", "wan", "--repeats", "1", "--prompts", "1", "--steps", "8", "--frames", "5",
                   "--device", "cpu", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    presets = report["presets"]
    assert set(presets) == {"off", "quality", "balanced", "fast"}
    assert presets["off"]["psnr"] == 100.0 and presets["off"]["cached_steps"] == 0
    assert presets["fast"]["flops_speedup"] > 1.2 and presets["fast"]["token_fraction"] < 1
    assert all(p["seconds_per_frame"] > 0 for p in presets.values())


def test_transformer_benchmark_compares_every_method_side_by_side(tmp_path, one_torch_thread):
    from benchmarks.video_transformer import METHODS

    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nkept\n")
    argv = ["--transformer", "--size", "64x32", "--frames", "9", "--dim", "64", "--layers", "2", "--steps", "12",
            "--repeats", "2", "--json", str(tmp_path / "t.json"), "--docs", str(docs)]
    report = main(argv)
    assert json.loads((tmp_path / "t.json").read_text()) == json.loads(json.dumps(report))
    # 9 frames of 64 x 32: 3 latent frames of 8 x 4, in 2 x 2 patches.
    assert report["tokens"] == 3 * 4 * 2 and report["latent"] == [3, 4, 8]
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == [name for name, _ in METHODS]
    off, fast = rows["uncached"], rows["ClusCa fast"]
    assert off["flops_speedup"] == 1.0 and off["rel_error"] == 0.0 and off["cached_steps"] == 0
    # Random weights move the output fast: the divergence guard runs some of fast's cached steps in full.
    assert fast["flops_speedup"] > 1.3 and fast["cached_steps"] > 0 and 0 < fast["rel_error"] < 1
    assert rows["FORA N6"]["config"].startswith("fora, interval 6") and "K 16" in fast["config"]
    assert all(len(r["times"]) == 2 and r["wall_speedup"] > 0 for r in rows.values())
    # The per-round times are saved whole: the speedups are the medians of their ratios.
    ratios = sorted(u / t for u, t in zip(off["cpu_s"], fast["cpu_s"]))
    assert fast["cpu_speedup"] == sum(ratios) / 2 and len(fast["wall_s"]) == 2
    text = docs.read_text()
    assert "kept" in text and "**24 spatio-temporal tokens**" in text and "| ClusCa fast |" in text
    # The command as quoted leaves out where the results and the section went.
    assert str(tmp_path) not in text and "--repeats 2 --docs`" in text
    # Rendered again from the saved file alone: the same section.
    main(["--from-json", str(tmp_path / "t.json"), "--docs", str(docs)])
    assert docs.read_text() == text
