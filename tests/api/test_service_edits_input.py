"""Edits at the door: an image, a mask and a strength are checked before any job exists.

Every bad input gets a 4xx naming its field (413 for too many bytes), and nothing is queued
or stored. The built-in model ``shapes`` edits (and inpaints) at 32 x 32 only; ``noop`` draws from
text alone. Its worker is not needed: nothing here reaches one.
"""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service.api.edit_inputs import EditInput, EditInputs, decode_image, decode_mask
from service.api.errors import ApiError
from service.api.resolve import JobAsk, resolve_job
from service.broker.keys import stream_key
from service.registry import ModelEntry, Registry
from service.settings import Settings


def png(size=(32, 32), mode="RGB", color=(200, 30, 30), noisy=False) -> bytes:
    if noisy:
        rng = np.random.default_rng(0)
        im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    else:
        im = Image.new(mode, size, color)
    out = io.BytesIO()
    im.save(out, "PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` but whose data is one tiny compressed run:
    what a decompression bomb looks like before it is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _gif() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(out, "GIF")
    return out.getvalue()


IMAGE = b64(png())
MASK = b64(png(mode="L", color=255))

BAD = [
    ({"strength": 0.5}, 422, "strength", "needs an image"),
    ({"mask": MASK}, 422, "mask", "needs an image"),
    ({"image": "not base64 at all!"}, 422, "image", "not base64"),
    ({"image": b64(b"hello, world")}, 422, "image", "not a PNG, JPEG or WebP"),
    ({"image": b64(png(noisy=True)[:400])}, 422, "image", "truncated"),
    ({"image": b64(_gif())}, 422, "image", "not a PNG, JPEG or WebP"),
    ({"image": "data:text/plain;base64," + IMAGE}, 422, "image", "expected an image"),
    ({"image": b64(png((64, 64)))}, 422, "image", "supported sizes: 32x32"),
    ({"image": b64(png_claiming(5000, 5000))}, 422, "image", "5000x5000"),
    ({"image": b64(png_claiming(100_000, 100_000))}, 422, "image", "too large to decode"),
    ({"image": IMAGE, "mask": b64(png((16, 16), "L", 255))}, 422, "mask", "must have the image's size, 32x32"),
    ({"image": IMAGE, "mask": "%%%"}, 422, "mask", "not base64"),
    ({"image": IMAGE, "width": 64}, 422, "width", "the image's is 32"),
    ({"image": IMAGE, "strength": 0}, 422, "strength", ""),
    ({"image": IMAGE, "strength": 1.5}, 422, "strength", ""),
    ({"image": IMAGE, "model": "noop"}, 422, "image", "does not edit images"),
]


def _queued(r) -> int:
    return sum(r.xlen(stream_key(m)) for m in ("shapes", "noop"))


@pytest.mark.parametrize("extra,status,param,words", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_a_bad_edit_is_refused_naming_its_field_and_nothing_is_queued(service, extra, status, param, words):
    r = service.redis_client()
    before, inputs_before = _queued(r), len(r.keys("clusca:*:input:*"))
    with service.client() as c:
        resp = c.post("/generate", json={"model": "shapes", "prompt": "a red circle", **extra})
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert _queued(r) == before and len(r.keys("clusca:*:input:*")) == inputs_before
    if "supported sizes" in words:
        assert err["supported_sizes"] == ["32x32"]


def test_an_image_over_the_byte_cap_is_413_before_it_is_decoded(service):
    proc, url = service.start_api({"CLUSCA_MAX_INPUT_BYTES": "1024"})
    try:
        import httpx

        big = png(noisy=True)
        assert len(big) > 1024
        with httpx.Client(base_url=url, timeout=30) as c:
            resp = c.post("/generate", json={"model": "shapes", "prompt": "x", "image": b64(big)})
            small = c.post("/generate", json={"model": "shapes", "prompt": "x", "image": IMAGE, "width": 16})
            upload = c.post("/v1/images/edits", data={"prompt": "x", "model": "shapes"},
                            files=[("image", ("big.png", big, "image/png"))])
        assert resp.status_code == upload.status_code == 413, (resp.text, upload.text)
        assert upload.json()["error"]["param"] == "image"
        assert resp.json()["error"]["param"] == "image" and "CLUSCA_MAX_INPUT_BYTES" in resp.json()["error"]["message"]
        assert small.status_code == 422 and small.json()["error"]["param"] == "width"  # a small one is read
    finally:
        service.stop(proc)


def test_models_say_what_they_edit(service):
    with service.client() as c:
        models = {m["name"]: m for m in c.get("/models").json()["models"]}
    assert models["shapes"]["edits"] == "inpaint"
    assert models["noop"]["edits"] == models["tinyflux"]["edits"] == models["noopvideo"]["edits"] == "none"


def test_edits_default_by_pipeline_class_and_a_video_model_takes_none():
    entry = lambda cls, **kw: ModelEntry(name="m", kind="diffusers", path="/m", pipeline_class=cls, **kw)  # noqa: E731
    assert entry("FluxInpaintPipeline").edits == "inpaint"
    assert entry("FluxImg2ImgPipeline").edits == "image"
    assert entry("FluxPipeline").edits == "none" and entry("FluxPipeline", edits="image").edits == "image"
    with pytest.raises(ValueError, match="video model takes none"):
        entry("WanPipeline", edits="image")


def _resolve(entry: ModelEntry, ask: JobAsk):
    return asyncio.run(resolve_job(Registry([entry]), Settings(redis_url="redis://x"), ask))


def test_a_mask_needs_a_model_that_inpaints():
    i2i = ModelEntry(name="i2i", kind="diffusers", path="/m", pipeline_class="FluxImg2ImgPipeline",
                     defaults={"width": 32, "height": 32})
    image = decode_image("image", png(), 4096)
    mask = decode_mask("mask", png(mode="L", color=255), 4096)
    _, job = _resolve(i2i, JobAsk("p", model="i2i", edit=EditInputs(image)))
    assert (job.image, job.mask, job.strength, job.width) == (image.digest, None, 0.8, 32)
    with pytest.raises(ApiError) as exc:
        _resolve(i2i, JobAsk("p", model="i2i", edit=EditInputs(image, mask)))
    assert exc.value.status == 422 and exc.value.param == "mask" and "does not inpaint" in exc.value.message


def test_a_mask_is_white_to_repaint_here_and_transparent_to_edit_in_openais_convention():
    grey = Image.new("L", (4, 1))
    grey.putdata([0, 127, 128, 255])
    out = io.BytesIO()
    grey.save(out, "PNG")
    white = decode_mask("mask", out.getvalue(), 64)
    assert np.asarray(Image.open(io.BytesIO(white.png))).ravel().tolist() == [0, 0, 255, 255]
    rgba = Image.new("RGBA", (4, 1))
    rgba.putdata([(9, 9, 9, 0), (9, 9, 9, 127), (9, 9, 9, 128), (0, 0, 0, 255)])
    out = io.BytesIO()
    rgba.save(out, "PNG")
    alpha = decode_mask("mask", out.getvalue(), 64, alpha=True)
    assert np.asarray(Image.open(io.BytesIO(alpha.png))).ravel().tolist() == [255, 255, 0, 0]
    with pytest.raises(ApiError, match="no alpha channel"):
        decode_mask("mask", png(), 4096, alpha=True)


def test_an_input_is_named_by_the_digest_of_the_png_the_worker_reads():
    a, b = decode_image("image", png(), 4096), decode_image("image", png(), 4096)
    assert a == b and len(a.digest) == 64 and a.png.startswith(b"\x89PNG")
    assert EditInput(a.png, 32, 32).digest == a.digest != decode_image("image", png(color=(0, 0, 0)), 4096).digest


# ---------------------------------------------------------------------------- /v1/images/edits
def _rgba_mask(alpha: int = 0, size=(32, 32)) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", size, (0, 0, 0, alpha)).save(out, "PNG")
    return out.getvalue()


def _files(image=None, mask=None, image_name="image", image_type="image/png"):
    files = [(image_name, ("in.png", png() if image is None else image, image_type))]
    return files + ([("mask", ("mask.png", mask, "image/png"))] if mask is not None else [])


FORM = {"prompt": "a blue square", "model": "shapes", "n": "1", "response_format": "b64_json"}
BAD_FORMS = [
    (dict(data=FORM, files=[("image", (None, "not a file"))]), 422, "image", "must be a file part"),
    (dict(data=FORM, files=_files(image_type="text/plain")), 422, "image", "sent as text/plain"),
    (dict(data=FORM, files=[("mask", ("m.png", _rgba_mask(), "image/png"))]), 422, "image", "is required"),
    # The SDK's image=[a, b] is repeated image[] parts; no model here takes more than one image.
    (dict(data=FORM, files=_files(image_name="image[]") + _files(image_name="image[]")), 422, "image[]",
     "model 'shapes' takes 1 input image per edit; this request has 2"),
    (dict(data=FORM, files=_files() * 3), 422, "image", "takes 1 input image per edit; this request has 3"),
    (dict(data=FORM, files=_files(mask=_rgba_mask()) + [("mask", ("m.png", _rgba_mask(), "image/png"))]), 422,
     "mask", "one mask per request"),
    (dict(data=FORM, files=_files(mask=png())), 422, "mask", "no alpha channel"),
    (dict(data=FORM, files=_files(mask=_rgba_mask(size=(16, 16)))), 422, "mask", "the image's size, 32x32"),
    (dict(data={**FORM, "size": "64x64"}, files=_files()), 422, "size", "32x32"),
    (dict(data={**FORM, "size": "32x32"}, files=_files(image=png((64, 64)))), 422, "size", "the image is 64x64"),
    (dict(data={**FORM, "n": "zero"}, files=_files()), 422, "n", ""),
    (dict(data={**FORM, "strength": "2"}, files=_files()), 422, "strength", ""),
    (dict(data={k: v for k, v in FORM.items() if k != "prompt"}, files=_files()), 422, "prompt", "is required"),
    (dict(data={**FORM, "model": "noop"}, files=_files(image=png((16, 16)))), 422, "image", "does not edit"),
    (dict(data=FORM, files=_files(image=b"GIF89a....")), 422, "image", "not a PNG, JPEG or WebP"),
]


@pytest.mark.parametrize("send,status,param,words", BAD_FORMS, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD_FORMS)])
def test_a_bad_openai_edit_form_is_refused_naming_its_field(service, send, status, param, words):
    r = service.redis_client()
    before = _queued(r)
    with service.client() as c:
        resp = c.post("/v1/images/edits", **send)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert _queued(r) == before


@pytest.mark.parametrize("kind", ["json", "form"])
def test_an_openai_edit_that_is_not_multipart_is_415_naming_its_content_type(service, kind):
    with service.client() as c:
        resp = c.post("/v1/images/edits", json={"prompt": "x", "image": IMAGE}) if kind == "json" \
            else c.post("/v1/images/edits", data={"prompt": "x"})
    assert resp.status_code == 415, resp.text
    err = resp.json()["error"]
    sent = "application/json" if kind == "json" else "application/x-www-form-urlencoded"
    assert err["param"] == "body" and sent in err["message"] and "multipart/form-data" in err["message"]


def test_the_openai_edit_form_is_in_the_schema(service):
    with service.client() as c:
        op = c.get("/openapi.json").json()["paths"]["/v1/images/edits"]["post"]
    form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "mask", "prompt", "n", "size", "strength"} <= set(form["properties"])
    assert {"413", "415", "422"} <= set(op["responses"])
