"""`clusca tune` on a video model: a tiny random WanPipeline, scored frame by frame."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clusca.tune import psnr, ssim
from clusca.tune import score
from service.registry import Registry
from service.cli.tune import side_files, tune_model

MODELS = """models:
  - name: tinywan
    kind: diffusers
    pipeline_class: WanPipeline
    path: {path}
    defaults: {{width: 32, height: 32, steps: 10, guidance: 5.0, cache: balanced, num_frames: 5, fps: 8}}
    limits: {{size_multiple: 16, max_side: 64, max_frames: 9, frame_step: 4}}
    options: {{warmup: false, call_kwargs: {{max_sequence_length: 16}}}}
"""


def test_a_video_is_scored_per_frame_and_averaged():
    rng = np.random.default_rng(0)
    ref = rng.random((4, 16, 16, 3))
    out = ref.copy()
    out[2] = np.clip(out[2] + 0.2 * rng.standard_normal(out[2].shape), 0, 1)  # one frame gone wrong
    q = score(out, ref)
    per_frame = [psnr(a, b) for a, b in zip(out, ref)]
    assert q["psnr"] == pytest.approx(np.mean(per_frame)) and q["psnr"] > psnr(out, ref) + 20
    assert q["ssim"] == pytest.approx(np.mean([ssim(a, b) for a, b in zip(out, ref)]))
    assert score(out[0], ref[0]) == {"psnr": psnr(out[0], ref[0]), "ssim": ssim(out[0], ref[0])}


def test_tune_runs_on_a_tiny_random_wan_pipeline(tmp_path, one_torch_thread):
    pytest.importorskip("transformers")
    from tests.worker.video_support import build_tiny_wan

    build_tiny_wan(tmp_path / "pipe")
    models = tmp_path / "models.yaml"
    models.write_text(MODELS.format(path=tmp_path / "pipe"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a paper boat on a pond\na red kite in the wind\n")
    out = tmp_path / "wan-tuned.yaml"
    result = tune_model("tinywan", minutes=0.5, out=out, prompts=prompts, models_file=str(models),
                        progress=lambda _m: None)

    entry = Registry.load(out).get("tinywan")  # the registry takes the file as written
    assert entry.output == "video" and entry.defaults.num_frames == 5
    assert entry.defaults.cache_presets == result["presets"] and set(result["presets"]) == {"quality", "balanced",
                                                                                            "fast"}
    src = entry.defaults.cache_presets_source
    assert src["num_frames"] == 5 and "per frame" in src["quality"]
    for name in result["presets"]:
        assert entry.cache_config({"preset": name}).mode in ("fora", "taylorseer", "clusca")
    data = json.loads(side_files(out)[0].read_text())
    assert data["complete"] and data["meta"]["num_frames"] == 5 and data["final"]
    measured = [v for c in data["candidates"] for v in c["items"].values()]
    assert measured and all(0 < v["psnr"] <= 100 and 0 < v["ssim"] <= 1 for v in measured)
    # a cached video differs from the uncached one somewhere, and the score says by how much
    assert any(v["psnr"] < 100 for v in measured)
