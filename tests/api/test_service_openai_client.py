"""The OpenAI Python SDK itself (the ``openai`` package) against a real API: every images,
videos and models call the service serves, made the way a product backend makes it
(``images.edit`` runs on the built-in model, in tests/worker/test_service_edits.py).

``tests/api/test_service_openai_sdk.py`` pins the wire format the SDK sends; this file makes
sure the SDK, as released, reads every answer (and every error) as its own objects.
"""

from __future__ import annotations

import base64
import io

import openai
import pytest
from PIL import Image

from tests.support import wait_until


@pytest.fixture()
def client(service):
    with sdk(service) as c:
        yield c


def sdk(service) -> openai.OpenAI:
    """The SDK pointed at ``service``; no retries, so an error reaches the test as raised."""
    return openai.OpenAI(base_url=service.base_url + "/v1", api_key="sk-unused", max_retries=0, timeout=120)


def test_images_generate_and_its_errors(client):
    res = client.images.generate(model="noop", prompt="a red circle", n=2, size="16x16", response_format="b64_json",
                                 extra_body={"steps": 2, "seed": 5})
    assert len(res.data) == 2
    assert {Image.open(io.BytesIO(base64.b64decode(d.b64_json))).size for d in res.data} == {(16, 16)}
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        client.images.generate(model="noop", prompt="x", size="1024x1024")
    assert bad.value.status_code == 422 and bad.value.body["param"] == "size"
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="no-such-model", prompt="x")


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    assert {"noop", "noopvideo", "shapes"} <= set(ids)
    assert client.models.retrieve("noopvideo").id == "noopvideo"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_videos_create_retrieve_list_download_delete(client):
    video = client.videos.create(model="noopvideo", prompt="a paper boat", seconds="1", size="16x16",
                                 extra_body={"steps": 2, "seed": 7, "output_format": "gif"})
    assert video.status == "queued" and video.id.startswith("video_")
    done = wait_until(lambda: (v := client.videos.retrieve(video.id)).status in ("completed", "failed") and v,
                      timeout=60, what=f"video {video.id}")
    assert done.status == "completed", done
    assert video.id in [v.id for v in client.videos.list()]
    content = client.videos.download_content(video.id, variant="video")
    assert content.read()[:3] == b"GIF"
    assert client.videos.delete(video.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)


def test_images_edit_given_a_list_of_images_is_a_422_naming_the_models_limit(client):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, "PNG")
    png = buf.getvalue()
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        client.images.edit(model="shapes", image=[("a.png", png, "image/png"), ("b.png", png, "image/png")],
                           prompt="x")
    assert bad.value.body["param"].startswith("image") and "1 input image" in bad.value.body["message"]
