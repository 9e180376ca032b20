"""An edit's inputs kept in the shared folder (``CLUSCA_VIDEO_STORE=dir://``) reach the worker from there.

Its own API and built-in model worker, both given the folder (as every process of a deployment
must be); Redis then holds no input at all.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support import Service, wait_until
from service.broker.keys import workers_key
from service.outputs.inputs import digest_of, file_ref, keep_in_folder, read_input
from service.outputs.store import DirStore, RedisStore
from clusca_shapes import WEIGHTS_DIR

WEIGHTS = Path(os.environ.get("CLUSCA_TEST_SHAPES_WEIGHTS", WEIGHTS_DIR))


def _png(im: Image.Image) -> bytes:
    out = io.BytesIO()
    im.save(out, "PNG")
    return out.getvalue()


def test_a_folder_input_is_read_back_only_when_its_bytes_are_the_ones_named(tmp_path):
    store = DirStore(tmp_path, ttl_s=60)
    data = _png(Image.new("RGB", (8, 8), (1, 2, 3)))
    digest = digest_of(data)
    keep_in_folder(store, digest, data)
    assert read_input(store, digest, lambda: None) == data
    name = file_ref(digest).decode().split(":", 1)[1]
    (tmp_path / name).write_bytes(data + b"tampered")
    assert read_input(store, digest, lambda: None) is None
    assert read_input(RedisStore(1 << 20), digest, lambda: data) == data
    assert read_input(RedisStore(1 << 20), digest, lambda: None) is None
    # The folder's sweep knows input files: they expire with the result TTL like videos.
    os.utime(tmp_path / name, (0, 0))
    assert store.sweep() == 1 and not (tmp_path / name).exists()


@pytest.mark.skipif(not (WEIGHTS / "model_index.json").exists(), reason=f"no built-in model checkpoint at {WEIGHTS}")
def test_an_inpainting_through_the_folder_store(service, tmp_path):
    folder = tmp_path / "store"
    env = {"CLUSCA_VIDEO_STORE": f"dir://{folder}"}
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  - name: shapes\n    kind: builtin\n    path: {WEIGHTS}\n")
    worker = service.start_worker("shapes", {**env, "CLUSCA_MODELS": str(models), "CLUSCA_TORCH_THREADS": "1",
                                             "CLUSCA_VISIBILITY_TIMEOUT_S": "60"}, wait=False)
    api, url = service.start_api(env)
    try:
        r = service.redis_client()
        wait_until(lambda: worker.poll() is not None or r.zcard(workers_key("shapes")) > 0, timeout=180,
                   what="shapes worker")
        src = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
        mask = Image.new("L", (32, 32), 0)
        mask.paste(255, (0, 0, 16, 32))
        inputs_in_redis = len(r.keys("clusca:*:input:*"))
        with httpx.Client(base_url=url, timeout=180) as c:
            resp = c.post("/generate", json={"model": "shapes", "prompt": "a red circle on the left", "steps": 10,
                                             "image": base64.b64encode(_png(src)).decode(),
                                             "mask": base64.b64encode(_png(mask)).decode()})
        assert resp.status_code == 200, resp.text
        out = np.asarray(Image.open(io.BytesIO(base64.b64decode(resp.json()["images"][0]))).convert("RGB"))
        assert np.array_equal(out[:, 16:], np.asarray(src)[:, 16:])
        assert len(list(folder.glob("*.png"))) == 2 and len(r.keys("clusca:*:input:*")) == inputs_in_redis
    finally:
        Service.stop(api)
        Service.stop(worker, timeout=60)
