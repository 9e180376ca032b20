"""Video models served end to end: tiny random WanPipeline and HunyuanVideoPipeline (built here, no
downloads) behind POST /generate and the OpenAI-style /v1/videos API, with MP4 / WebP / GIF outputs
decoded back."""

from __future__ import annotations

import base64
import io
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from tests.support import Service, wait_until
from service.broker.keys import stream_key
from service.broker.embedded import free_port

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
av = pytest.importorskip("av")

from tests.worker.video_support import build_tiny_hunyuan_video, build_tiny_wan  # noqa: E402

W, H, FRAMES = 48, 32, 9
MODELS = """models:
  - name: tinywan
    kind: diffusers
    pipeline_class: WanPipeline
    path: {path}
    defaults: {{width: 48, height: 32, steps: 3, guidance: 5.0, cache: "off", num_frames: 9, fps: 8}}
    limits: {{size_multiple: 16, max_side: 64, max_frames: 17, frame_step: 4, max_video_pixels: 26112}}
    options: {{warmup: false, call_kwargs: {{max_sequence_length: 16}}}}
  - name: tinyhunyuan
    kind: diffusers
    pipeline_class: HunyuanVideoPipeline
    path: {hunyuan}
    defaults: {{width: 48, height: 32, steps: 3, guidance: 6.0, cache: "off", num_frames: 9, fps: 8}}
    limits: {{size_multiple: 16, max_side: 64, max_frames: 17, frame_step: 4}}
    options: {{warmup: false, call_kwargs: {{max_sequence_length: 16}}}}
  - name: noop
    kind: noop
    defaults: {{width: 16, height: 16, steps: 4, guidance: 0, cache: "off", size_multiple: 8}}
"""


class Served(NamedTuple):
    url: str
    metrics_url: str
    models_file: Path
    videos: Path


@pytest.fixture(scope="module")
def wan(service, tmp_path_factory):
    root = tmp_path_factory.mktemp("tinywan")
    build_tiny_wan(root / "pipe")
    build_tiny_hunyuan_video(root / "hunyuan")
    models = root / "models.yaml"
    models.write_text(MODELS.format(path=root / "pipe", hunyuan=root / "hunyuan"))
    # These workers keep videos in a folder (the no-op video tests cover the Redis store).
    env = {"CLUSCA_MODELS": str(models), "CLUSCA_VISIBILITY_TIMEOUT_S": "60", "CLUSCA_TORCH_THREADS": "1",
           "CLUSCA_VIDEO_STORE": f"dir://{root / 'videos'}"}
    metrics_port = free_port()
    worker = service.start_worker("tinywan,tinyhunyuan", env, metrics_port=metrics_port, timeout=180)
    api, url = service.start_api(env)
    yield Served(url, f"http://127.0.0.1:{metrics_port}/metrics", models, root / "videos")
    Service.stop(api)
    Service.stop(worker, timeout=60)


def _client(url: str):
    import httpx

    return httpx.Client(base_url=url, timeout=120)


def mp4_frames(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def animated(data: bytes, fmt: str) -> tuple[int, tuple[int, int]]:
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    assert im.format == fmt
    return im.n_frames, im.size


@pytest.mark.parametrize("model", ["tinywan", "tinyhunyuan"])
def test_generate_returns_an_mp4_of_the_requested_frames_and_size(wan, model):
    url = wan.url
    with _client(url) as c:
        r = c.post("/generate", json={"model": model, "prompt": "a paper boat", "seed": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["output_format"] == "mp4" and body["num_frames"] == FRAMES and body["fps"] == 8
        assert body["images"] == []  # linked, not inlined
        raw = c.get(body["links"]["images"][0])
        assert raw.status_code == 200 and raw.headers["content-type"] == "video/mp4"
        inline = c.post("/generate", json={"model": model, "prompt": "a paper boat", "seed": 3,
                                           "inline": True}).json()
    frames = mp4_frames(raw.content)
    assert len(frames) == FRAMES and frames[0].shape == (H, W, 3)
    assert base64.b64decode(inline["images"][0]) == raw.content  # same seed, same video
    assert body["cache_stats"]["full_steps"] == 3


@pytest.mark.parametrize("fmt,pil_name", [("webp", "WEBP"), ("gif", "GIF")])
def test_animated_webp_and_gif(wan, fmt, pil_name):
    url = wan.url
    with _client(url) as c:
        body = c.post("/generate", json={"model": "tinywan", "prompt": "waves", "seed": 1, "output_format": fmt,
                                         "num_frames": 5, "width": 32, "inline": True}).json()
    assert body["status"] == "succeeded", body
    assert animated(base64.b64decode(body["images"][0]), pil_name) == (5, (32, H))


def test_async_video_job_streams_progress_per_step(wan):
    url = wan.url
    with _client(url) as c:
        job = c.post("/generate", json={"model": "tinywan", "prompt": "rain", "steps": 4, "async": True}).json()
        with c.stream("GET", f"/jobs/{job['id']}/events") as ev:
            kinds = [line[7:] for line in ev.iter_lines() if line.startswith("event: ")]
    assert kinds.count("progress") == 4 and kinds[-1] == "finished"


def _wait_video(c, video_id: str) -> dict:
    return wait_until(lambda: (v := c.get(f"/v1/videos/{video_id}").json())["status"] not in
                      ("queued", "in_progress") and v, timeout=60, what="video")


def test_v1_videos_life_cycle(wan):
    url = wan.url
    with _client(url) as c:
        r = c.post("/v1/videos", json={"model": "tinywan", "prompt": "a fox", "size": "32x32", "seconds": "1",
                                       "fps": 8, "seed": 5, "steps": 8, "cache": {"preset": "fast", "guard": False}})
        assert r.status_code == 200, r.text
        created = r.json()
        assert created["object"] == "video" and created["status"] == "queued" and created["id"].startswith("video_")
        assert created["size"] == "32x32" and created["num_frames"] == 9  # 1 s at 8 fps, 1 + 4k frames
        done = _wait_video(c, created["id"])
        assert done["status"] == "completed" and done["progress"] == 100 and done["completed_at"]
        # The run's statistics come with the video: fast computes steps 0-2 in full and predicts the other 5
        # (the divergence guard is off: on random weights it would add full steps to the schedule).
        stats = done["cache_stats"]
        assert (stats["mode"], stats["full_steps"], stats["cached_steps"]) == ("clusca", 3, 5), stats
        assert stats["kmeans_calls"] > 0 and stats["flops_speedup"] > 1
        full = c.get(f"/v1/videos/{created['id']}/content")
        assert full.status_code == 200 and full.headers["accept-ranges"] == "bytes"
        size = len(full.content)
        part = c.get(f"/v1/videos/{created['id']}/content", headers={"Range": "bytes=0-99"})
        tail = c.get(f"/v1/videos/{created['id']}/content", headers={"Range": "bytes=-10"})
        beyond = c.get(f"/v1/videos/{created['id']}/content", headers={"Range": f"bytes={size}-"})
        files = {p.name for p in wan.videos.iterdir()}
        finished_delete = c.delete(f"/v1/videos/{created['id']}")
        after = [c.get(f"/v1/videos/{created['id']}/content"), c.get(f"/v1/videos/{created['id']}")]
    frames = mp4_frames(full.content)
    assert len(frames) == 9 and frames[0].shape == (32, 32, 3)
    assert part.status_code == 206 and part.content == full.content[:100]
    assert part.headers["content-range"] == f"bytes 0-99/{size}"
    assert tail.status_code == 206 and tail.content == full.content[-10:]
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{size}"
    # Deleting a finished video removes its file and its record, as OpenAI's videos.delete does.
    assert len({n for n in files if n.startswith(created["id"].removeprefix("video_"))}) == 1
    assert finished_delete.status_code == 200
    assert finished_delete.json() == {"id": created["id"], "object": "video.deleted", "deleted": True}
    assert [a.status_code for a in after] == [404, 404]
    assert not any(p.name.startswith(created["id"].removeprefix("video_")) for p in wan.videos.iterdir())


def test_v1_videos_cancel_and_unknown_ids(wan):
    url = wan.url
    with _client(url) as c:
        # The worker is busy with the first video; the second waits in the queue and is cancelled there.
        busy = c.post("/v1/videos", json={"model": "tinywan", "prompt": "long", "steps": 50, "num_frames": 17,
                                          "size": "64x16"}).json()
        queued = c.post("/v1/videos", json={"model": "tinywan", "prompt": "never"}).json()
        gone = c.delete(f"/v1/videos/{queued['id']}")
        running = c.delete(f"/v1/videos/{busy['id']}")
        assert gone.status_code == 200 and gone.json()["status"] == "cancelled"
        assert running.status_code == 200 and running.json()["status"] in ("cancelled", "in_progress", "queued")
        # A running video stops at its next step (unless its last step was already under way).
        assert _wait_video(c, busy["id"])["status"] in ("cancelled", "completed")
        assert c.get(f"/v1/videos/{queued['id']}/content").status_code == 409
        for bad in (f"video_{uuid.uuid4().hex}", "nonsense", uuid.uuid4().hex):
            for r in (c.get(f"/v1/videos/{bad}"), c.get(f"/v1/videos/{bad}/content"), c.delete(f"/v1/videos/{bad}")):
                assert r.status_code == 404 and r.json()["error"]["code"] == "video_not_found", r.text
        # An image job is not a video.
        image_job = c.post("/generate", json={"model": "noop", "prompt": "x", "async": True}).json()
        assert c.get(f"/v1/videos/video_{image_job['id']}").status_code == 404


def test_out_of_limit_videos_are_refused_before_any_worker(wan, service):
    url = wan.url
    r = service.redis_client()
    before = r.xlen(stream_key("tinywan")) if r.exists(stream_key("tinywan")) else 0
    # (/generate fields, /v1/videos fields or None, the field named, the message)
    cases = [
        ({"num_frames": 21}, {"num_frames": 21}, "num_frames", "at most 17"),
        ({"num_frames": 8}, {"num_frames": 8}, "num_frames", "1 plus a multiple of 4"),
        ({"num_frames": 25}, {"seconds": "3"}, "num_frames", "at most 17"),  # 3 s at 8 fps: 25 frames
        ({"num_frames": 17, "width": 64}, {"num_frames": 17, "size": "64x32"}, "num_frames",
         "exceeds the limit of 26112"),  # 64 x 32 x 17 pixels
        ({"output_format": "png"}, None, "output_format", "makes videos"),
        ({"width": 40}, None, "width", "multiple of 16"),
        ({"width": 40}, {"size": "40x32"}, "size", "multiple of 16"),
    ]
    with _client(url) as c:
        for generate, v1, param, text in cases:
            for path, extra in (("/generate", generate), ("/v1/videos", v1)):
                if extra is None or (path == "/generate" and param == "size"):
                    continue
                resp = c.post(path, json={"model": "tinywan", "prompt": "x", **extra})
                assert resp.status_code == 422, (path, extra, resp.text)
                err = resp.json()["error"]
                assert err["param"] == param and text in err["message"], (path, extra, err)
        # An image model takes no frames, and the videos API serves video models only.
        assert c.post("/generate", json={"model": "noop", "prompt": "x", "num_frames": 9}).json()["error"]["param"] \
            == "num_frames"
        assert c.post("/generate", json={"model": "noop", "prompt": "x", "output_format": "mp4"}).status_code == 422
        assert c.post("/v1/videos", json={"model": "noop", "prompt": "x"}).json()["error"]["param"] == "model"
        assert c.post("/v1/images/generations", json={"model": "tinywan", "prompt": "x"}).json()["error"][
            "param"] == "model"
    after = r.xlen(stream_key("tinywan")) if r.exists(stream_key("tinywan")) else 0
    assert after == before


@pytest.mark.parametrize("model", ["tinywan", "tinyhunyuan"])
def test_cache_on_the_video_transformer_interval_1_exact_fast_fewer_flops(wan, model):
    url, metrics_url = wan.url, wan.metrics_url
    body = {"model": model, "prompt": "a lighthouse", "seed": 11, "steps": 10, "inline": True,
            "output_format": "gif"}  # lossless frames: exact comparisons
    with _client(url) as c:
        runs = {name: c.post("/generate", json={**body, "cache": cache}).json() for name, cache in
                (("off", {"preset": "off"}), ("every", {"preset": "balanced", "interval": 1}),
                 ("fast", {"preset": "fast", "guard": False}))}  # the schedule's savings, no guard trips
        import httpx

        text = httpx.get(metrics_url, timeout=10).text
    assert all(r["status"] == "succeeded" for r in runs.values()), runs
    assert runs["every"]["images"] == runs["off"]["images"]
    assert runs["every"]["cache_stats"]["cached_steps"] == 0
    fast = runs["fast"]["cache_stats"]
    assert fast["cached_steps"] > 0 and fast["flops"] < fast["flops_uncached"] and fast["flops_speedup"] > 1.5
    assert f'clusca_frames_generated_total{{cache_mode="clusca",model="{model}"}}' in text
    assert "clusca_seconds_per_frame_count" in text


def test_video_runner_warms_up_and_batched_videos_equal_lone_ones(wan, caplog, one_torch_thread):
    import logging

    from service.registry import Registry
    from service.worker.runners import Batch, load_runner

    entry = Registry.load(wan.models_file).get("tinywan").model_copy(update={"options": {
        "call_kwargs": {"max_sequence_length": 16}}})  # warm-up on
    with caplog.at_level(logging.INFO, logger="clusca.worker"):
        runner = load_runner(entry, "cpu")
    assert any("warmed up" in r.message for r in caplog.records), caplog.text
    cache = entry.cache_config({"preset": "off"})
    common = dict(width=32, height=32, steps=3, guidance=5.0, cache=cache, num_frames=5, negative_prompts=None)
    pair = runner.run(Batch(prompts=["a", "b"], seeds=[1, 2], **common), lambda step: False).images
    alone = [runner.run(Batch(prompts=[p], seeds=[s], **common), lambda step: False).images[0]
             for p, s in (("a", 1), ("b", 2))]
    assert [v.shape for v in pair] == [(5, 32, 32, 3)] * 2
    for k in range(2):
        assert np.abs(pair[k] - alone[k]).max() < 1e-4
    assert np.abs(pair[0] - pair[1]).max() > 1e-3


def test_clusters_are_per_video_over_its_frames_and_patches(wan, monkeypatch, one_torch_thread):
    """ClusCa on a served video model clusters each video's own spatio-temporal tokens (latent frames
    x patches), so a cached video does not depend on its batch mates, and the run's statistics come back."""
    import clusca.hooks
    from service.registry import Registry
    from service.worker.runners import Batch, load_runner

    seen: list[tuple[int, ...]] = []
    real = clusca.hooks.kmeans

    def recording(x, *args, **kwargs):
        seen.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(clusca.hooks, "kmeans", recording)
    entry = Registry.load(wan.models_file).get("tinywan")
    runner = load_runner(entry, "cpu")
    cache = entry.cache_config({"preset": "fast"})
    # 9 frames of 64 x 32: 3 latent frames (the VAE keeps 1 + 8/4) of 8 x 4 latents, 2 x 2 patches: 3 x 4 x 2 tokens.
    common = dict(width=64, height=32, steps=6, guidance=5.0, cache=cache, num_frames=9, negative_prompts=None)
    pair = runner.run(Batch(prompts=["a kite", "a train"], seeds=[1, 2], **common), lambda step: False)
    pair_shapes, seen[:] = list(seen), []
    alone = [runner.run(Batch(prompts=[p], seeds=[s], **common), lambda step: False).images[0]
             for p, s in (("a kite", 1), ("a train", 2))]
    assert pair_shapes and {s[:2] for s in pair_shapes} == {(2, 3 * 4 * 2)}, pair_shapes
    assert {s[:2] for s in seen} == {(1, 3 * 4 * 2)}, seen
    stats = pair.stats
    assert stats.cached_steps > 0 and stats.kmeans_calls == len(pair_shapes) and stats.flops_speedup > 1
    for k in range(2):
        assert np.abs(pair.images[k] - alone[k]).max() < 1e-4
