"""Where videos are kept: the directory store on its own (write, byte ranges, delete, expiry), and a
worker and API sharing a folder (CLUSCA_VIDEO_STORE=dir://...) against a real Redis; DELETE of
/v1/videos on both stores (the Redis one is the session's)."""

from __future__ import annotations

import base64
import os
import time
import uuid
from pathlib import Path

import pytest

from tests.support import Service, wait_until
from service.broker.keys import images_key, job_key
from service.settings import Settings, SettingsError
from service.outputs.store import GRACE_S, REF_PREFIX, DirStore, NotKept, OutputTooLarge, RedisStore, parse_spec

av = pytest.importorskip("av")

MP4 = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4


def _job() -> str:
    return uuid.uuid4().hex


# ---------------------------------------------------------------------------- the store alone
def test_dir_store_keeps_files_and_reads_byte_ranges(tmp_path):
    store = DirStore(tmp_path / "videos", ttl_s=3600)
    job = _job()
    ref = store.put(job, 0, MP4, "mp4")
    assert ref.startswith(REF_PREFIX) and MP4 not in ref
    files = list((tmp_path / "videos").iterdir())
    assert [f.name for f in files] == [ref[len(REF_PREFIX):].decode()] and files[0].read_bytes() == MP4
    blob = store.open(ref)
    assert blob.size == len(MP4) and blob.read() == MP4 and blob.read(10, 19) == MP4[10:20]
    # Two writers of one job (a takeover) never share a file: each can drop its own.
    other = store.put(job, 0, MP4[:50], "mp4")
    assert other != ref and store.open(other).read() == MP4[:50]
    store.delete([other])
    assert store.open(other) is None and store.open(ref).read() == MP4


def test_dir_store_serves_only_its_own_files(tmp_path):
    store = DirStore(tmp_path, ttl_s=3600)
    secret = tmp_path.parent / "secret.mp4"
    secret.write_bytes(b"not yours")
    for forged in (b"clusca-file:../secret.mp4", b"clusca-file:/etc/passwd",
                   REF_PREFIX + f"{_job()}-0-{'0' * 12}.mp4".encode()):  # well formed, no such file
        assert store.open(forged) is None
        store.delete([forged])
    assert secret.read_bytes() == b"not yours"
    assert store.open(MP4).read() == MP4  # bytes stored before the folder was configured


def test_dir_store_expires_files_with_the_result_ttl(tmp_path):
    store = DirStore(tmp_path, ttl_s=100)
    old, fresh = store.put(_job(), 0, MP4, "gif"), store.put(_job(), 0, MP4, "webp")
    foreign = tmp_path / "notes.txt"
    foreign.write_text("an operator's file")
    stale_tmp = tmp_path / f".tmp-{_job()}-0-{'a' * 12}.mp4"  # a write cut short
    stale_tmp.write_bytes(b"half")
    past = time.time() - 100 - GRACE_S - 5
    for path in (tmp_path / old[len(REF_PREFIX):].decode(), stale_tmp, foreign):
        os.utime(path, (past, past))
    assert store.open(old) is None  # past its TTL: gone for readers even before a sweep
    assert store.sweep() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["notes.txt", fresh[len(REF_PREFIX):].decode()])
    assert store.open(fresh).read() == MP4


def test_a_folder_that_cannot_be_written_fails_the_video_not_the_worker(tmp_path):
    (tmp_path / "not-a-folder").write_text("")
    store = DirStore(tmp_path / "not-a-folder" / "videos", ttl_s=3600)
    with pytest.raises(NotKept, match="could not be written to the video store folder"):
        store.put(_job(), 0, MP4, "mp4")
    assert store.sweep() == 0  # nothing to sweep there, and no error either: the worker still starts


def test_redis_store_keeps_the_bytes_up_to_its_cap():
    store = RedisStore(max_bytes=1024)
    assert store.put(_job(), 0, MP4[:1024], "mp4") == MP4[:1024]
    with pytest.raises(OutputTooLarge, match="CLUSCA_MAX_OUTPUT_BYTES"):
        store.put(_job(), 0, MP4, "mp4")


def test_video_store_setting():
    assert Settings.from_env({}).video_store == "redis"
    assert parse_spec(Settings.from_env({"CLUSCA_VIDEO_STORE": "dir:///var/lib/clusca/videos"}).video_store) \
        == Path("/var/lib/clusca/videos")
    for bad in ("dir://relative/path", "s3://bucket/videos", "disk"):
        with pytest.raises(SettingsError, match="CLUSCA_VIDEO_STORE"):
            Settings.from_env({"CLUSCA_VIDEO_STORE": bad})


def test_compose_shares_the_video_folder_between_the_api_and_every_worker():
    import re

    import yaml

    compose = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text())
    services = compose["services"]
    default = re.fullmatch(r"\$\{CLUSCA_VIDEO_STORE:-(.+)\}", services["api"]["environment"]["CLUSCA_VIDEO_STORE"])
    folder = str(parse_spec(default.group(1)))
    for name in ("api", "worker", "worker-cpu"):
        assert services[name]["environment"]["CLUSCA_VIDEO_STORE"] == default.group(0), name
        assert f"videos:{folder}" in services[name]["volumes"], name
    assert "videos" in compose["volumes"]


# ---------------------------------------------------------------------------- served, sharing a folder
MODELS = """models:
  - name: dirvideo
    kind: noop
    output: video
    defaults: {width: 16, height: 16, steps: 3, guidance: 0, cache: "off", size_multiple: 8, num_frames: 5, fps: 8}
    limits: {max_frames: 17, frame_step: 4}
  - name: dirslow
    kind: noop
    output: video
    options: {step_delay_s: 0.2}
    defaults: {width: 16, height: 16, steps: 30, guidance: 0, cache: "off", size_multiple: 8, num_frames: 5, fps: 8}
    limits: {max_frames: 17, frame_step: 4}
  - name: noop
    kind: noop
    defaults: {width: 16, height: 16, steps: 2, guidance: 0, cache: "off", size_multiple: 8}
"""


@pytest.fixture(scope="module")
def shared(service, tmp_path_factory):
    root = tmp_path_factory.mktemp("dirstore")
    (root / "models.yaml").write_text(MODELS)
    folder = root / "videos"
    env = {"CLUSCA_MODELS": str(root / "models.yaml"), "CLUSCA_VIDEO_STORE": f"dir://{folder}"}
    worker = service.start_worker("dirvideo,dirslow", env)
    api, url = service.start_api(env)
    yield url, folder
    Service.stop(api)
    Service.stop(worker)


def _frames(data: bytes) -> int:
    import io

    with av.open(io.BytesIO(data)) as c:
        return sum(1 for _ in c.decode(video=0))


def test_videos_are_files_in_the_shared_folder(service, shared):
    import httpx

    url, folder = shared
    with httpx.Client(base_url=url, timeout=30) as c:
        body = c.post("/generate", json={"model": "dirvideo", "prompt": "on disk", "seed": 4}).json()
        inline = c.post("/generate", json={"model": "dirvideo", "prompt": "on disk", "seed": 4, "inline": True}).json()
        full = c.get(body["links"]["images"][0])
        part = c.get(body["links"]["images"][0], headers={"Range": "bytes=8-15"})
        video = c.post("/v1/videos", json={"model": "dirvideo", "prompt": "api", "num_frames": 9}).json()
        wait_until(lambda: c.get(f"/v1/videos/{video['id']}").json()["status"] == "completed", what="video")
        content = c.get(f"/v1/videos/{video['id']}/content")
        tail = c.get(f"/v1/videos/{video['id']}/content", headers={"Range": "bytes=-7"})
    assert body["status"] == "succeeded" and body["images"] == [], body
    assert full.status_code == 200 and full.headers["content-type"] == "video/mp4" and _frames(full.content) == 5
    assert base64.b64decode(inline["images"][0]) == full.content
    assert part.status_code == 206 and part.content == full.content[8:16]
    assert content.status_code == 200 and _frames(content.content) == 9
    assert tail.status_code == 206 and tail.content == content.content[-7:]
    # Redis holds a reference per video, the folder the bytes.
    ref = service.redis_client().hget(images_key(body["id"]), "0")
    assert ref.startswith(REF_PREFIX) and len(ref) < 100
    assert (folder / ref[len(REF_PREFIX):].decode()).read_bytes() == full.content


def test_delete_removes_the_file_and_the_video(service, shared):
    import httpx

    url, folder = shared
    r = service.redis_client()
    with httpx.Client(base_url=url, timeout=30) as c:
        video = c.post("/v1/videos", json={"model": "dirvideo", "prompt": "to delete"}).json()
        wait_until(lambda: c.get(f"/v1/videos/{video['id']}").json()["status"] == "completed", what="video")
        job_id = video["id"].removeprefix("video_")
        path = folder / r.hget(images_key(job_id), "0")[len(REF_PREFIX):].decode()
        assert path.exists()
        deleted = c.delete(f"/v1/videos/{video['id']}")
        after = [c.get(f"/v1/videos/{video['id']}/content"), c.get(f"/v1/videos/{video['id']}"),
                 c.delete(f"/v1/videos/{video['id']}")]
        job = c.get(f"/jobs/{job_id}")
    assert deleted.status_code == 200 and deleted.json() == {"id": video["id"], "object": "video.deleted",
                                                             "deleted": True}
    assert not path.exists() and not r.exists(images_key(job_id)) and not r.exists(job_key(job_id))
    assert [a.status_code for a in after] == [404, 404, 404] and job.status_code == 404


def test_delete_cancels_a_running_video_then_deletes_it(service, shared):
    import httpx

    url, folder = shared
    with httpx.Client(base_url=url, timeout=30) as c:
        video = c.post("/v1/videos", json={"model": "dirslow", "prompt": "long"}).json()
        wait_until(lambda: c.get(f"/v1/videos/{video['id']}").json()["status"] == "in_progress", what="start")
        first = c.delete(f"/v1/videos/{video['id']}")
        stopped = wait_until(lambda: (v := c.get(f"/v1/videos/{video['id']}").json())["status"] != "in_progress"
                             and v, timeout=20, what="cancel")
        second = c.delete(f"/v1/videos/{video['id']}")
        gone = c.get(f"/v1/videos/{video['id']}")
    assert first.status_code == 200 and first.json()["object"] == "video"  # still there, stopping
    assert stopped["status"] == "cancelled" and stopped["progress"] < 100
    assert second.json()["object"] == "video.deleted" and gone.status_code == 404
    job_id = video["id"].removeprefix("video_")
    assert not any(p.name.startswith(job_id) for p in folder.iterdir())  # a cancelled video wrote nothing


def test_delete_on_the_redis_store(service):
    r = service.redis_client()
    with service.client() as c:
        video = c.post("/v1/videos", json={"model": "noopvideo", "prompt": "in redis"}).json()
        wait_until(lambda: c.get(f"/v1/videos/{video['id']}").json()["status"] == "completed", what="video")
        job_id = video["id"].removeprefix("video_")
        content = c.get(f"/v1/videos/{video['id']}/content")
        stored = r.hget(images_key(job_id), "0")
        deleted = c.delete(f"/v1/videos/{video['id']}")
        after = c.get(f"/v1/videos/{video['id']}/content")
    assert stored == content.content and _frames(stored) == 5  # the bytes themselves, beside the job
    assert deleted.json() == {"id": video["id"], "object": "video.deleted", "deleted": True}
    assert after.status_code == 404 and after.json()["error"]["code"] == "video_not_found"
    assert not r.exists(images_key(job_id)) and not r.exists(job_key(job_id))
