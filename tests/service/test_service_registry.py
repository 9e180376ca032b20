"""The model registry (service/registry.py): entries from the operator's file, their defaults and
limits, preset tuning, the built-in model's checkpoint, and a clear error for a bad file."""

from __future__ import annotations

import json

import pytest

from clusca import ClusCaConfig
from clusca_shapes import read_index
from service.registry import ModelLimits, Registry
from service.settings import Settings
from tests.support import models_yaml, noop_model, registry_error


def _load(tmp_path, *models: dict) -> Registry:
    path = tmp_path / "models.yaml"
    path.write_text(models_yaml(*models))
    return Registry.load(path)


def test_entries_keep_the_files_order_and_are_found_by_name(tmp_path):
    reg = _load(tmp_path, noop_model("zeta", 2), {"name": "alpha", "kind": "diffusers", "path": "org/alpha"},
                noop_model("mid", 3))
    assert reg.names == ["zeta", "alpha", "mid"] == [e.name for e in reg.entries()]
    assert "alpha" in reg and "alph" not in reg and reg.get("omega") is None
    assert reg.get("alpha").path == "org/alpha" and reg.get("mid").defaults.steps == 3


def test_an_entry_that_sets_nothing_gets_the_documented_defaults(tmp_path):
    entry = _load(tmp_path, {"name": "bare", "kind": "noop"}).get("bare")
    d, lim = entry.defaults, entry.limits
    assert (d.width, d.height, d.steps, d.guidance, d.cache, d.fps, d.num_frames) == (1024, 1024, 28, 3.5, "balanced",
                                                                                        16, None)
    assert (entry.pipeline_class, entry.dtype, entry.device, entry.output, entry.options) == ("auto", "float32", "auto",
                                                                                              "image", {})
    # No bound of its own beyond the pipeline's granularity: the service-wide limits apply.
    assert (lim.size_multiple, lim.min_side, lim.max_side, lim.max_pixels, lim.max_steps) == (16, 8, None, None, None)
    assert d.size_multiple == lim.size_multiple and d.cache_presets == {}
    assert entry.public() == {"name": "bare", "kind": "noop", "output": "image", "edits": "none",
                              "pipeline_class": "auto", "dtype": "float32", "defaults": d.model_dump(),
                              "parallel": {"ulysses": 1, "ring": 1, "world": 1}}


def test_a_video_pipeline_makes_a_video_model_whose_default_frames_fit_its_limits(tmp_path):
    reg = _load(tmp_path, {"name": "wan", "kind": "diffusers", "path": "/m/wan", "pipeline_class": "WanPipeline",
                           "limits": {"max_frames": 9, "frame_step": 4}},
                {"name": "free", "kind": "diffusers", "path": "/m/free", "output": "video"},
                {"name": "flux", "kind": "diffusers", "path": "/m/flux", "pipeline_class": "FluxPipeline"})
    assert (reg.get("wan").output, reg.get("wan").defaults.num_frames) == ("video", 9)
    assert (reg.get("free").output, reg.get("free").defaults.num_frames) == ("video", 17)
    assert (reg.get("flux").output, reg.get("flux").defaults.num_frames) == ("image", None)


def test_the_service_limits_tighten_a_models_own(tmp_path):
    reg = _load(tmp_path, noop_model("img", 4, limits={"max_side": 512, "max_steps": 20}),
                noop_model("clip", 3, video=True, limits={"max_frames": 33, "frame_step": 4}))
    settings = Settings.from_env({"CLUSCA_MAX_SIDE": "260", "CLUSCA_MAX_STEPS": "50", "CLUSCA_MAX_PIXELS": "40000",
                                  "CLUSCA_MAX_IMAGES": "2", "CLUSCA_MAX_FRAMES": "17"})
    img = reg.get("img").limits_within(settings)
    assert (img.max_side, img.max_steps, img.max_pixels, img.max_images, img.max_frames) == (256, 20, 40000, 2, None)
    assert reg.get("clip").limits_within(settings).max_frames == 17  # frames bound only video models


def test_size_and_frame_problems_name_the_field_and_the_bound():
    lim = ModelLimits(size_multiple=16, max_side=512, max_pixels=65536, max_frames=17, frame_step=4,
                      max_video_pixels=16 * 16 * 17)
    assert lim.size_problem(256, 256) is None
    assert lim.size_problem(250, 256) == ("width", "must be a multiple of 16")
    assert lim.size_problem(256, 528) == ("height", "must be at most 512")
    assert lim.size_problem(512, 512)[0] == "width" and "65536" in lim.size_problem(512, 512)[1]
    assert lim.frames_problem(16, 16, 17) is None
    assert lim.frames_problem(16, 16, 21) == ("num_frames", "must be at most 17")
    assert lim.frames_problem(16, 16, 8) == ("num_frames", "must be 1 plus a multiple of 4")
    assert lim.frames_problem(16, 16, 17, videos=2)[0] == "num_images"


def test_a_request_names_a_preset_the_model_may_retune_and_its_own_knobs_come_last(tmp_path):
    presets = {"fast": {"interval": 4}, "balanced": {"interval": 6}}
    entry = _load(tmp_path, noop_model("tuned", 4, defaults={"cache": "fast", "cache_presets": presets})).get("tuned")
    assert entry.cache_settings() == {"preset": "fast", "interval": 4}
    assert entry.cache_settings({"preset": "balanced", "clusters": 8}) == {"preset": "balanced", "interval": 6,
                                                                          "clusters": 8}
    assert entry.cache_settings({"interval": 2}) == {"preset": "fast", "interval": 2}
    assert entry.cache_settings({"preset": "quality"}) == {"preset": "quality"}  # not retuned: the library's
    assert entry.cache_config() == ClusCaConfig.from_dict({"preset": "fast", "interval": 4})


def test_a_builtin_entry_takes_its_limits_from_its_checkpoint_unless_the_operator_sets_them(tmp_path):
    index = read_index(None)
    reg = _load(tmp_path, {"name": "shapes", "kind": "builtin"},
                {"name": "small", "kind": "builtin", "limits": {"max_side": 64}})
    shapes, small = reg.get("shapes"), reg.get("small")
    assert shapes.limits.size_multiple == index["patch_size"]
    assert {k: getattr(shapes.limits, k) for k in index["limits"]} == index["limits"]
    assert (shapes.defaults.width, shapes.defaults.steps) == (index["default_width"], index["default_steps"])
    # The operator's limits replace the checkpoint's; sizes stay multiples of the patch size.
    assert (small.limits.max_side, small.limits.max_pixels, small.limits.size_multiple) == (64, None,
                                                                                             index["patch_size"])


@pytest.mark.parametrize("text,fragments", [
    ("models:\n  - name: a\n   kind: noop\n", ["CLUSCA_MODELS: ", "models.yaml is not valid YAML", "line 3"]),
    ("models: []\n", ["CLUSCA_MODELS: ", "models.yaml: the model registry is empty"]),
    (models_yaml(noop_model("a", 2), noop_model("a", 3)), ["CLUSCA_MODELS: ", "model 'a' is listed twice"]),
    ("models:\n  - just-a-name\n", ["CLUSCA_MODELS: models[0]:", "dictionary"]),
    (models_yaml(noop_model("ok", 2), noop_model("bad", 2, limits={"max_sid": 64})),
     ["CLUSCA_MODELS: models[1].limits.max_sid:", "not permitted"]),
    (models_yaml(noop_model("bad", 2, defaults={"width": 4})), ["models[0].defaults.width:", "8"]),
    (models_yaml(noop_model("bad", 2, defaults={"cache": "turbo"})), ["models[0].defaults.cache:", "'turbo'"]),
])
def test_a_bad_registry_file_is_an_error_that_says_where(tmp_path, text, fragments):
    message = registry_error(tmp_path, text)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_a_json_registry_is_read_by_its_suffix(tmp_path):
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": [noop_model("a", 2), noop_model("b", 3)]}))
    assert Registry.load(path).names == ["a", "b"]
    path.write_text("{models: [}")
    with pytest.raises(ValueError, match="not valid YAML/JSON"):
        Registry.load(path)
