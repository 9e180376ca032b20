"""Edits on the built-in model through the whole service: image-to-image and inpainting.

A real worker runs the shapes pipeline; the API checks and stores the inputs, the worker reads
them back. An edit equals the direct pipeline call, the cache schedules the steps actually
denoised, inpainting keeps every pixel outside its mask, and batched edits equal solo ones.
"""

from __future__ import annotations

import base64
import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support import submit_shapes, succeeded_job, wait_until
from clusca_shapes import WEIGHTS_DIR

WEIGHTS = Path(os.environ.get("CLUSCA_TEST_SHAPES_WEIGHTS", WEIGHTS_DIR))
pytestmark = pytest.mark.skipif(not (WEIGHTS / "model_index.json").exists(),
                                reason=f"no built-in model checkpoint at {WEIGHTS}")


@pytest.fixture(scope="module")
def shapes(service, tmp_path_factory):
    with service.builtin_worker(WEIGHTS, tmp_path_factory.mktemp("shapes-edits")):
        yield service


@pytest.fixture(scope="module")
def pipe():
    from clusca_shapes import ShapesFluxPipeline

    return ShapesFluxPipeline.from_pretrained(WEIGHTS)


def _png(im: Image.Image) -> str:
    out = io.BytesIO()
    im.save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def _source(pipe, prompt: str, seed: int) -> Image.Image:
    import torch

    return pipe(prompt=[prompt], generator=[torch.Generator().manual_seed(seed)], num_inference_steps=20).images[0]


def _half_mask(side: str) -> Image.Image:
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, {"right": (16, 0, 32, 32), "top": (0, 0, 32, 16), "centre": (8, 8, 24, 24)}[side])
    return mask


def _gen(c, **body):
    r = c.post("/generate", json={"model": "shapes", "prompt": "a blue square at the top", **body}, timeout=180)
    assert r.status_code == 200, r.text
    return r.json()


def test_image_to_image_equals_the_direct_pipeline_call(shapes, pipe):
    import torch

    src = _source(pipe, "a red circle on the left", 1)
    with shapes.client() as c:
        body = _gen(c, image=_png(src), strength=0.6, seed=4, steps=20, cache={"mode": "off"})
    assert (body["width"], body["height"], body["strength"], body["masked"]) == (32, 32, 0.6, False)
    assert body["step"] == body["steps"] == 20  # progress counts the whole schedule
    direct = pipe(prompt=["a blue square at the top"], generator=[torch.Generator().manual_seed(4)],
                  num_inference_steps=20, guidance_scale=body["guidance"], image=src, strength=0.6).images[0]
    assert np.array_equal(_pixels(body["images"][0]), np.asarray(direct, dtype=np.int16))
    # It starts from the image: closer to it than the text-to-image run of the same seed and prompt.
    with shapes.client() as c:
        fresh = _gen(c, seed=4, steps=20, cache={"mode": "off"})
    assert psnr(_pixels(body["images"][0]), np.asarray(src)) > psnr(_pixels(fresh["images"][0]), np.asarray(src))


def test_the_cache_schedules_the_steps_an_edit_denoises(shapes, pipe):
    from clusca import ClusCaConfig

    src = _source(pipe, "a green triangle", 2)
    with shapes.client() as c:
        body = _gen(c, image=_png(src), strength=0.5, seed=5, steps=24, cache={"preset": "fast"})
    stats, cfg = body["cache_stats"], ClusCaConfig.from_dict(body["cache"])
    assert stats["full_steps"] + stats["cached_steps"] == 12  # the last half of 24 steps
    assert stats["full_steps"] == len(cfg.full_steps(12)) and stats["cached_steps"] > 0


def test_inpainting_keeps_every_pixel_outside_its_mask(shapes, pipe):
    src = _source(pipe, "a red circle on the left", 3)
    mask = _half_mask("right")
    with shapes.client() as c:
        body = _gen(c, image=_png(src), mask=_png(mask), seed=6, steps=20, prompt="a blue square on the right")
    assert body["strength"] == 1.0 and body["masked"] is True
    out, before = _pixels(body["images"][0]), np.asarray(src, dtype=np.int16)
    keep = np.asarray(mask) < 128
    assert psnr(out[keep], before[keep]) >= 35 and np.array_equal(out[keep], before[keep])
    assert psnr(out[~keep], before[~keep]) < 30  # the masked half was redrawn


def test_batched_edits_equal_solo_ones(shapes, pipe):
    sources = [_source(pipe, p, s) for p, s in (("a red circle", 7), ("a yellow square", 8), ("a green circle", 9))]
    masks = [_half_mask(side) for side in ("right", "top", "centre")]
    asks = [dict(prompt=f"a blue triangle {k}", image=_png(im), mask=_png(m), strength=0.9, seed=30 + k, steps=16,
                 cache={"preset": "balanced"}) for k, (im, m) in enumerate(zip(sources, masks))]
    with shapes.client() as c:
        # A text-to-image job ahead keeps the worker busy while the three edits queue behind it.
        ahead = submit_shapes(c, prompt="a red circle", steps=50, seed=1)
        time.sleep(0.2)
        ids = [submit_shapes(c, **a) for a in asks]
        together = [succeeded_job(c, j) for j in ids]
        assert succeeded_job(c, ahead)["batch_images"] == 1  # a text-to-image job never shares an edit's call
        alone = [_gen(c, **a) for a in asks]
    assert [j["batch_images"] for j in together] == [3, 3, 3]
    assert all(a["batch_images"] == 1 for a in alone)
    for job, solo, src, mask in zip(together, alone, sources, masks):
        batched, single = _pixels(base64.b64encode(job["png"]).decode()), _pixels(solo["images"][0])
        # Float summation order may differ between batch sizes: one rounding level per channel at most.
        assert np.abs(batched - single).max() <= 2
        keep = np.asarray(mask) < 128
        assert np.array_equal(batched[keep], np.asarray(src, dtype=np.int16)[keep])


def test_an_input_that_expired_fails_its_job_with_the_reason(shapes, pipe):
    r = shapes.redis_client()
    src = _source(pipe, "a red circle", 10)
    with shapes.client() as c:
        ahead = submit_shapes(c, prompt="a red circle", steps=50, seed=1)
        time.sleep(0.2)
        job_id = submit_shapes(c, image=_png(src), prompt="x", steps=8)
        for key in r.keys("clusca:*:input:*"):
            r.delete(key)
        succeeded_job(c, ahead)
        wait_until(lambda: c.get(f"/jobs/{job_id}").json()["status"] == "failed", timeout=60, what="failed edit")
        assert "no longer stored" in c.get(f"/jobs/{job_id}").json()["error"]


@pytest.mark.parametrize("image_name", ["image", "image[]"])
def test_openai_images_edit_as_the_sdk_sends_it(shapes, pipe, image_name):
    """The multipart form of the OpenAI SDK's ``client.images.edit(image=..., mask=..., prompt=..., n=...,
    size=...)``: files ``image`` (``image[]`` for a list) and ``mask``, text fields for the rest; its
    mask is transparent where the image is to be edited."""
    src = _source(pipe, "a yellow circle", 11)
    alpha = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    alpha.paste((0, 0, 0, 0), (0, 0, 32, 16))  # the top half is transparent: redraw it
    files = []
    for name, im in ((image_name, src), ("mask", alpha)):
        out = io.BytesIO()
        im.save(out, "PNG")
        files.append((name, (f"{name.strip('[]')}.png", out.getvalue(), "image/png")))
    form = {"prompt": "a blue square at the top", "model": "shapes", "n": "2", "size": "32x32",
            "response_format": "b64_json", "seed": "12", "steps": "12"}
    with shapes.client() as c:
        resp = c.post("/v1/images/edits", data=form, files=files, timeout=180)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert len(body["data"]) == 2 and body["seed"] == 12
    before = np.asarray(src, dtype=np.int16)
    for item in body["data"]:
        out = _pixels(item["b64_json"])
        assert np.array_equal(out[16:], before[16:]) and not np.array_equal(out[:16], before[:16])


def test_an_edit_repeated_with_its_idempotency_key_is_the_same_job(shapes, pipe):
    src, other = _source(pipe, "a red circle", 12), _source(pipe, "a red circle", 13)
    body = {"model": "shapes", "prompt": "a blue square", "image": _png(src), "steps": 8, "async": True}
    headers = {"Idempotency-Key": "edit-once"}
    with shapes.client() as c:
        first = c.post("/generate", json=body, headers=headers)
        again = c.post("/generate", json=body, headers=headers)
        changed = c.post("/generate", json={**body, "image": _png(other)}, headers=headers)
    assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
    assert changed.status_code == 422 and changed.json()["error"]["code"] == "idempotency_key_reused"


def _png_bytes(size: tuple[int, int], alpha: int | None = None) -> bytes:
    image = Image.new("RGB", size, (200, 30, 30)) if alpha is None else Image.new("RGBA", size, (200, 30, 30, alpha))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_the_openai_sdks_images_edit_inpaints_and_reads_a_bad_mask_as_a_422(shapes):
    import openai

    from tests.api.test_service_openai_client import sdk

    with sdk(shapes) as client:
        # OpenAI's convention: the mask's transparent pixels are redrawn.
        res = client.images.edit(model="shapes", image=("in.png", _png_bytes((32, 32)), "image/png"),
                                 mask=("mask.png", _png_bytes((32, 32), alpha=0), "image/png"), prompt="a blue square",
                                 n=1, extra_body={"steps": 4, "seed": 3})
        assert Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json))).size == (32, 32)
        with pytest.raises(openai.UnprocessableEntityError) as bad:
            client.images.edit(model="shapes", image=("in.png", _png_bytes((32, 32)), "image/png"),
                               mask=("mask.png", _png_bytes((16, 16), alpha=0), "image/png"), prompt="x")
        assert bad.value.body["param"] == "mask"
