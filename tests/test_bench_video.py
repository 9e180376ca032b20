"""The video cache benchmark runs end to end on a tiny random WanPipeline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
