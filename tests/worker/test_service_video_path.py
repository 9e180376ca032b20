"""The video service path without torch: the no-op model with ``output: video`` (flat frames) behind
the session's API and main worker: outputs, idempotency, webhooks and the per-call memory bound."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from tests.support import wait_until, webhook_receiver

av = pytest.importorskip("av")


def _frames(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_noop_video_is_an_mp4_of_distinct_frames(service):
    with service.client() as c:
        body = c.post("/generate", json={"model": "noopvideo", "prompt": "ramp", "seed": 2, "inline": True}).json()
        models = {m["name"]: m for m in c.get("/models").json()["models"]}
        part = c.get(body["links"]["images"][0], headers={"Range": "bytes=4-11"})
    assert body["status"] == "succeeded" and body["output_format"] == "mp4", body
    assert part.status_code == 206 and part.content == base64.b64decode(body["images"][0])[4:12]
    assert part.headers["content-type"] == "video/mp4" and part.headers["content-range"].startswith("bytes 4-11/")
    frames = _frames(base64.b64decode(body["images"][0]))
    assert len(frames) == 5 and frames[0].shape == (16, 16, 3)
    means = [float(f.mean()) for f in frames]
    assert means == sorted(means) and means[-1] > means[0] + 10  # a ramp of one colour
    assert models["noopvideo"]["output"] == "video" and models["noop"]["output"] == "image"
    assert models["noopvideo"]["limits"]["max_frames"] == 17 and models["noop"]["limits"]["max_frames"] is None


def test_v1_videos_idempotency(service):
    body = {"model": "noopvideo", "prompt": "same", "seed": 9}
    with service.client() as c:
        first = c.post("/v1/videos", json=body, headers={"Idempotency-Key": "video-key-1"})
        again = c.post("/v1/videos", json=body, headers={"Idempotency-Key": "video-key-1"})
        other = c.post("/v1/videos", json={**body, "seed": 10}, headers={"Idempotency-Key": "video-key-1"})
    assert first.status_code == again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert other.status_code == 422 and other.json()["error"]["param"] == "Idempotency-Key"


def test_v1_videos_seconds_as_string_or_number(service):
    with service.client() as c:
        text = c.post("/v1/videos", json={"model": "noopvideo", "prompt": "x", "seconds": "1", "fps": 4}).json()
        number = c.post("/v1/videos", json={"model": "noopvideo", "prompt": "x", "seconds": 1, "fps": 4}).json()
        bad = c.post("/v1/videos", json={"model": "noopvideo", "prompt": "x", "seconds": "soon"})
    assert text["num_frames"] == number["num_frames"] == 5 and text["seconds"] == "1.25"
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "seconds"


def test_video_webhook_links_the_video(service):
    with webhook_receiver() as (hook, received):
        with service.client() as c:
            video = c.post("/v1/videos", json={"model": "noopvideo", "prompt": "hook",
                                               "webhook_url": f"{hook}/done"}).json()
        wait_until(lambda: received, timeout=10, what="webhook")
    payload = json.loads(received[0][1])
    job_id = video["id"].removeprefix("video_")
    assert payload["id"] == job_id and payload["status"] == "succeeded"
    assert payload["image_urls"] == [f"/jobs/{job_id}/images/0"] and payload["content_type"] == "video/mp4"


def test_videos_of_one_request_are_bounded_together(service):
    # noopvideo allows 2304 = 16 x 16 x 9 pixels of video per request (and per pipeline call).
    with service.client() as c:
        too_many = c.post("/generate", json={"model": "noopvideo", "prompt": "x", "num_images": 2})
        two_short = c.post("/generate", json={"model": "noopvideo", "prompt": "x", "num_images": 2,
                                              "num_frames": 1, "output_format": "gif", "seed": 1})
    err = too_many.json()["error"]
    assert too_many.status_code == 422 and err["param"] == "num_images" and "2304" in err["message"]
    body = two_short.json()
    assert body["status"] == "succeeded" and body["batch_images"] == 2 and len(body["links"]["images"]) == 2
