"""Model limits at the door: what each pipeline accepts is declared, published and enforced by the API.

No request the published schema admits may end in a 5xx: the sweep sends sizes, step counts
and image counts at and just beyond every declared limit, over real HTTP to a real API and
Redis, with real workers behind it (the no-op model and the built-in model's torch pipeline),
and counts the answers.
"""

from __future__ import annotations

import base64
import collections
import io
import json
import math

import httpx
import pytest
from PIL import Image

from tests.support import Service, registry_error
from service.broker.keys import stream_key
from clusca_shapes import PIPELINE_LIMITS, WEIGHTS_DIR
from service.registry import ModelLimits, Registry, builtin_entry


def _index() -> dict:
    return json.loads((WEIGHTS_DIR / "model_index.json").read_text())


# ---------------------------------------------------------------------------- declarations
def test_builtin_limits_come_from_the_checkpoint_and_match_the_pipeline():
    index = _index()
    lim = builtin_entry().limits
    assert lim.size_multiple == index["patch_size"]
    for key in ("max_side", "max_pixels", "max_steps", "max_images"):
        assert getattr(lim, key) == index["limits"][key], key

    from clusca_shapes import ShapesFluxPipeline

    pipe = ShapesFluxPipeline.from_pretrained(WEIGHTS_DIR)
    ok = dict(num_inference_steps=1, guidance_scale=0.0, num_images_per_prompt=1, output_type="pil")
    # Exactly at every limit the pipeline accepts; one unit beyond it refuses.
    pipe.check_inputs(lim.max_side, lim.size_multiple, **ok)
    pipe.check_inputs(lim.size_multiple, lim.max_side, **ok)
    side = math.isqrt(lim.max_pixels) // lim.size_multiple * lim.size_multiple
    pipe.check_inputs(side, side, **ok)
    pipe.check_inputs(32, 32, **{**ok, "num_inference_steps": lim.max_steps})
    pipe.check_inputs(32, 32, **{**ok, "num_images_per_prompt": lim.max_images})
    for h, w, kw in ((lim.max_side + lim.size_multiple, 32, {}), (32, lim.max_side + lim.size_multiple, {}),
                     (34, 32, {}), (32, 32, {"num_inference_steps": lim.max_steps + 1}),
                     (32, 32, {"num_images_per_prompt": lim.max_images + 1})):
        with pytest.raises(ValueError):
            pipe.check_inputs(h, w, **{**ok, **kw})


def test_a_checkpoint_declaring_other_limits_changes_both_sides(tmp_path):
    index = {**_index(), "limits": {"max_side": 64, "max_pixels": 2048, "max_steps": 60, "max_images": 2}}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    for sub in ("transformer", "text_encoder", "tokenizer", "scheduler"):
        (tmp_path / sub).symlink_to(WEIGHTS_DIR / sub)
    lim = builtin_entry(tmp_path).limits
    assert (lim.max_side, lim.max_pixels, lim.max_steps, lim.max_images) == (64, 2048, 60, 2)
    from clusca_shapes import ShapesFluxPipeline

    pipe = ShapesFluxPipeline.from_pretrained(tmp_path)
    ok = dict(num_inference_steps=1, guidance_scale=0.0, num_images_per_prompt=1, output_type="pil")
    pipe.check_inputs(64, 32, **ok)
    for h, w in ((68, 32), (48, 48)):  # a side, then the pixel count
        with pytest.raises(ValueError):
            pipe.check_inputs(h, w, **ok)
    # Without a declaration the pipeline's own defaults apply.
    del index["limits"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert builtin_entry(tmp_path).limits.max_side == PIPELINE_LIMITS["max_side"]


def test_registry_limits_yaml_and_the_service_caps(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("models:\n  - name: flux\n    kind: diffusers\n    path: /models/flux\n"
                 "    defaults: {width: 1024, height: 1024, steps: 28}\n"
                 "    limits: {size_multiple: 16, max_side: 2048, max_pixels: 2000000, max_steps: 100, max_images: 2}\n"
                 "  - name: old\n    kind: noop\n    defaults: {width: 16, height: 16, size_multiple: 8}\n")
    reg = Registry.load(p)
    flux = reg.get("flux")
    capped = flux.limits.within(max_side=1000, max_pixels=4_000_000, max_steps=200, max_images=8)
    # The tighter bound wins; sides are rounded to the size multiple.
    assert (capped.max_side, capped.max_pixels, capped.max_steps, capped.max_images) == (992, 2_000_000, 100, 2)
    assert capped.min_side == 16
    # The older spelling `defaults.size_multiple` still sets the limit.
    assert reg.get("old").limits.size_multiple == 8 and reg.get("old").defaults.size_multiple == 8


@pytest.mark.parametrize("entry,fragment", [
    ("defaults: {width: 1000, height: 1024}\n    limits: {size_multiple: 16}", "default width 1000"),
    ("defaults: {width: 1024, height: 1024}\n    limits: {max_side: 512}", "default width 1024"),
    ("defaults: {width: 64, height: 64, steps: 50}\n    limits: {max_steps: 20}", "default steps 50"),
    ("defaults: {width: 64, height: 64, size_multiple: 8}\n    limits: {size_multiple: 16}", "differ"),
    ("limits: {max_side: 512, colour: red}", "colour"),
])
def test_defaults_outside_the_limits_fail_the_start(tmp_path, entry, fragment):
    message = registry_error(tmp_path, f"models:\n  - name: m\n    kind: noop\n    {entry}\n")
    assert fragment in message and "models[0]" in message


# ---------------------------------------------------------------------------- at the door
def _err(r: httpx.Response, param: str) -> dict:
    assert r.status_code == 422, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["param"] == param, err
    return err


def test_models_lists_each_models_limits(service):
    with service.client() as c:
        models = {m["name"]: m for m in c.get("/models").json()["models"]}
    # The built-in model: its pipeline's limits, tightened by the test deployment's CLUSCA_MAX_* ones.
    assert models["shapes"]["limits"] == {"size_multiple": 4, "min_side": 8, "max_side": 512, "max_pixels": 512 * 512,
                                          "min_steps": 1, "max_steps": 50, "max_images": 4, "max_frames": None,
                                          "frame_step": 1, "max_video_pixels": None, "max_cost": 983040,
                                          "sizes": ["32x32"], "long_cost": 204800}
    # A model without limits of its own gets the service's.
    assert models["noop"]["limits"]["max_side"] == 1024 and models["noop"]["limits"]["size_multiple"] == 8


@pytest.mark.parametrize("size", [(516, 652), (1024, 1024), (2048, 64), (64, 516), (34, 32), (64, 64), (8, 8)])
def test_sizes_the_builtin_model_does_not_draw_are_422_before_queueing(service, size):
    r = service.redis_client()
    before = r.xlen(stream_key("shapes"))
    with service.client() as c:
        err = _err(c.post("/generate", json={"prompt": "x", "model": "shapes", "width": size[0], "height": size[1]}),
                   "width")
    assert "'shapes'" in err["message"] and "the sizes it draws well: 32x32" in err["message"]
    assert f"{size[0]}x{size[1]}" in err["message"]
    assert r.xlen(stream_key("shapes")) == before


def test_openai_size_outside_the_model_is_a_4xx_listing_supported_sizes(service):
    with service.client() as c:
        r = c.post("/v1/images/generations", json={"prompt": "x", "model": "shapes", "size": "1024x1024"})
        err = _err(r, "size")
        assert "1024x1024" in err["message"] and "32x32" in err["message"]
        assert err["supported_sizes"] == ["auto", "32x32"]
        # Every size offered is one the API accepts for that model.
        limits = next(m for m in c.get("/models").json()["models"] if m["name"] == "shapes")["limits"]
        for size in err["supported_sizes"][1:]:
            assert ModelLimits(**limits).size_problem(*map(int, size.split("x"))) is None, size
        too_many = c.post("/v1/images/generations", json={"prompt": "x", "model": "shapes", "n": 5})
        assert "at most 4" in _err(too_many, "n")["message"]


def test_published_schema_bounds_come_from_the_models(service):
    with service.client() as c:
        props = c.get("/openapi.json").json()["components"]["schemas"]["GenerateRequest"]["properties"]
    # The widest model here is bounded by the service's CLUSCA_MAX_SIDE (1024), not the 16384 outer bound.
    assert props["width"]["anyOf"][0]["maximum"] == 1024
    assert props["steps"]["anyOf"][0]["maximum"] == 50


# ---------------------------------------------------------------------------- the sweep
SIZE = ("width", "height")


def _cases(limits: dict, defaults: dict) -> list[tuple[str, dict, bool, tuple[str, ...]]]:
    """``(label, request fields, expected to be accepted, fields a refusal may name)`` at and
    just beyond every limit."""
    m, lo, hi, px = limits["size_multiple"], limits["min_side"], limits["max_side"], limits["max_pixels"]
    w0, h0 = defaults["width"], defaults["height"]
    listed = limits.get("sizes")

    def fits(w: int, h: int) -> bool:
        if listed is not None:  # a model that lists its sizes takes only those
            return f"{w}x{h}" in listed
        return all(v % m == 0 and lo <= v <= hi for v in (w, h)) and w * h <= px

    cases = []
    for side in sorted({lo - m, lo, lo + 1, hi - m, hi, hi + 1, hi + m, 2 * hi}):
        if side >= 8:  # below 8 the schema itself refuses (tested elsewhere)
            cases.append((f"width={side}", {"width": side, "height": lo}, fits(side, lo), ("width",)))
            cases.append((f"height={side}", {"width": lo, "height": side}, fits(lo, side),
                          ("height",) if listed is None else SIZE))
    for size in listed or []:
        w, h = (int(v) for v in size.split("x"))
        cases.append((size, {"width": w, "height": h}, True, SIZE))
    sq = math.isqrt(px) // m * m
    for side in (sq, sq + m):
        cases.append((f"{side}x{side}", {"width": side, "height": side}, fits(side, side), SIZE))
    for steps in (limits["min_steps"], limits["max_steps"], limits["max_steps"] + 1):
        cases.append((f"steps={steps}", {"width": w0, "height": h0, "steps": steps},
                      limits["min_steps"] <= steps <= limits["max_steps"], ("steps",)))
    for n in (1, limits["max_images"], limits["max_images"] + 1):
        cases.append((f"num_images={n}", {"width": w0, "height": h0, "num_images": n}, n <= limits["max_images"],
                      ("num_images",)))
    return cases


def _sweep(url: str, model: str, extra: dict) -> collections.Counter:
    seen: collections.Counter = collections.Counter()
    with httpx.Client(base_url=url, timeout=300) as c:
        info = next(m for m in c.get("/models").json()["models"] if m["name"] == model)
        for label, fields, accepted, params in _cases(info["limits"], info["defaults"]):
            body = {"prompt": "a red circle", "model": model, "seed": 1, **extra, **fields}
            body.setdefault("steps", 1)
            r = c.post("/generate", json=body)
            seen[r.status_code] += 1
            assert r.status_code < 500, (label, r.status_code, r.text[:300])
            if accepted:
                assert r.status_code == 200 and r.json()["status"] == "succeeded", (label, r.text[:300])
                out = r.json()
                assert len(out["images"]) == body.get("num_images", 1)
                im = Image.open(io.BytesIO(base64.b64decode(out["images"][0])))
                assert im.size == (fields["width"], fields["height"]), label
            else:
                err = r.json()["error"]
                assert r.status_code == 422 and err["code"] == "validation_error", (label, r.text)
                assert err["param"] in params, (label, err)
            # The OpenAI endpoint: the same sizes and counts as `size` and `n`.
            if set(fields) <= {"width", "height", "num_images"}:
                o = {"prompt": "a red circle", "model": model, "seed": 1, "steps": 1, **extra,
                     "size": f"{fields['width']}x{fields['height']}", "n": fields.get("num_images", 1)}
                r = c.post("/v1/images/generations", json=o)
                seen[r.status_code] += 1
                assert r.status_code < 500, (label, "openai", r.status_code, r.text[:300])
                assert (r.status_code == 200) == accepted, (label, "openai", r.text[:300])
                if not accepted:
                    assert r.json()["error"]["param"] in ("size", "n"), r.text
    return seen


def test_sweep_noop_model_no_5xx(service):
    seen = _sweep(service.base_url, "noop", {})
    assert seen[200] and seen[422] and not any(s >= 500 for s in seen), seen


@pytest.fixture(scope="module")
def shapes_api(service, tmp_path_factory):
    """A worker with the built-in model and an API whose sync wait covers a 512x512 step on a busy CPU."""
    models = tmp_path_factory.mktemp("limits") / "models.yaml"
    models.write_text(f"models:\n  - name: shapes\n    kind: builtin\n    path: {WEIGHTS_DIR}\n")
    worker = service.start_worker("shapes", {"CLUSCA_MODELS": str(models), "CLUSCA_VISIBILITY_TIMEOUT_S": "120"},
                                  timeout=180)
    proc, url = service.start_api({"CLUSCA_SYNC_TIMEOUT_S": "240"})
    yield url
    Service.stop(proc)
    Service.stop(worker, timeout=60)


def test_sweep_builtin_model_no_5xx(shapes_api):
    # Guidance 0 (no second, unconditional pass) and one step keep the 512x512 case affordable on a CPU.
    seen = _sweep(shapes_api, "shapes", {"guidance": 0})
    assert seen[200] and seen[422] and not any(s >= 500 for s in seen), seen


def _video_cases(limits: dict, defaults: dict) -> list[tuple[str, dict, bool]]:
    """``(label, request fields, expected to be accepted)`` at and just beyond every frame limit:
    the frame count, its step, and the pixels of one request's videos together."""
    fmax, step, vpx = limits["max_frames"], limits["frame_step"], limits["max_video_pixels"]
    w, h = defaults["width"], defaults["height"]

    def fits(frames: int, n: int) -> bool:
        return frames <= fmax and (frames - 1) % step == 0 and w * h * frames * n <= vpx

    cases = []
    at_pixels = vpx // (w * h)  # most frames by the pixel bound alone
    for frames in sorted({1, 2, 1 + step, fmax - 1, fmax, fmax + 1, fmax + step, at_pixels, at_pixels + 1}):
        if frames >= 1:
            cases.append((f"num_frames={frames}", {"num_frames": frames}, fits(frames, 1)))
    for n in (1, 2, limits["max_images"], limits["max_images"] + 1):
        cases.append((f"num_images={n}", {"num_frames": 1 + step, "num_images": n},
                      fits(1 + step, n) and n <= limits["max_images"]))
    return cases


def test_sweep_noop_video_model_no_5xx(service):
    seen: collections.Counter = collections.Counter()
    with httpx.Client(base_url=service.base_url, timeout=120) as c:
        info = next(m for m in c.get("/models").json()["models"] if m["name"] == "noopvideo")
        cases = _video_cases(info["limits"], info["defaults"])
        assert any(ok for *_, ok in cases) and not all(ok for *_, ok in cases)
        for label, fields, accepted in cases:
            r = c.post("/generate", json={"prompt": "a red circle", "model": "noopvideo", "seed": 1, **fields})
            seen[r.status_code] += 1
            assert r.status_code < 500, (label, r.status_code, r.text[:300])
            if accepted:
                assert r.status_code == 200 and r.json()["status"] == "succeeded", (label, r.text[:300])
                assert r.json()["num_frames"] == fields["num_frames"], label
            else:
                err = r.json()["error"]
                assert r.status_code == 422 and err["param"] in ("num_frames", "num_images"), (label, r.text)
    assert seen[200] and seen[422], seen


@pytest.mark.parametrize("raw,field,limit", [
    (b'{"prompt":"x","steps":1e30}', "steps", "max_steps"),
    (b'{"prompt":"x","steps":100000}', "steps", "max_steps"),
    (b'{"prompt":"x","width":100000}', "width", "max_side"),
    (b'{"prompt":"x","num_images":1e20}', "num_images", "max_images"),
])
def test_a_value_past_every_bound_reports_the_models_limit(service, raw, field, limit):
    """However far out a value is, the answer names the model's limit, not an outer bound of the schema."""
    with service.client() as c:
        models = c.get("/models").json()
        lim = next(m for m in models["models"] if m["name"] == models["default_model"])["limits"]
        r = c.post("/generate", content=raw, headers={"Content-Type": "application/json"})
    err = _err(r, field)
    assert f"at most {lim[limit]}" in err["message"] and models["default_model"] in err["message"], err
