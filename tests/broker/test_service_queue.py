"""The queue's guarantees against a real Redis: exactly-once results, attempts, hand-back.

Each test runs against one server and against a 3-primary Redis Cluster (its scripts must
find all their keys in one slot there).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from clusca.config import ClusCaConfig

from service.broker import connect as redis_conn
from tests.broker.conftest import Backend
from service.contract import JobRecord, JobRequest, JobResult
from service.broker.keys import done_key, images_key, stream_key
from service.broker.producer import JobQueue
from service.broker.wire import QueueFull
from service.broker.consumer import WorkerQueue
from service.broker.keys import job_key
from tests.support import enqueue

REQ = JobRequest(prompt="p", width=16, height=16, steps=2, guidance=0.0, seed=1, cache=ClusCaConfig(mode="off"))




def _enqueue(url: str, model: str, n: int = 1, max_queue: int = 100, idem: str | None = None) -> list[tuple[str, bool]]:
    return enqueue(url, model, REQ, n, idem, max_queue=max_queue)


def _wq(backend: Backend, model: str, wid: str, vis: float = 30, attempts: int = 3) -> WorkerQueue:
    q = WorkerQueue(backend.redis_client(), worker_id=wid, models=[model], ttl_s=60, visibility_timeout_s=vis,
                    max_attempts=attempts)
    q.ensure_groups()
    return q


def test_two_workers_racing_store_one_result(backend):
    model = f"unit-{uuid.uuid4().hex[:6]}"
    a, b = _wq(backend, model, "A", vis=0.05), _wq(backend, model, "B", vis=0.05)
    (job_id, _), = _enqueue(backend.redis_url, model)
    da = a.read(1, block_ms=100)
    started_a, _ = a.start(da)
    time.sleep(0.1)
    db = b.reclaim(1)  # A looks dead: B takes the job over
    assert [d.job_id for d in db] == [job_id]
    started_b, _ = b.start(db)
    assert started_b[0].attempt == 2
    wins = [b.finish(started_b[0], "succeeded", JobResult(worker="B"), images=[b"img-B"]),
            a.finish(started_a[0], "succeeded", JobResult(worker="A"), images=[b"img-A"])]
    assert wins == [True, False]
    r = backend.redis_client()
    job = JobRecord.from_hash(r.hgetall(job_key(job_id)))
    assert job.status == "succeeded" and job.result == JobResult(worker="B")
    assert r.hgetall(images_key(job_id)) == {b"0": b"img-B"}
    assert r.xpending(stream_key(model), "workers")["pending"] == 0
    assert r.xlen(stream_key(model)) == 0
    assert r.lrange(done_key(job_id), 0, -1) == [b"succeeded"]


def test_job_fails_after_max_attempts_with_reason(backend):
    model = f"unit-{uuid.uuid4().hex[:6]}"
    qs = [_wq(backend, model, f"W{i}", vis=0.02, attempts=2) for i in range(3)]
    (job_id, _), = _enqueue(backend.redis_url, model)
    s0, _ = qs[0].start(qs[0].read(1, block_ms=100))
    time.sleep(0.05)
    s1, _ = qs[1].start(qs[1].reclaim(1))
    assert len(s0) == len(s1) == 1
    time.sleep(0.05)
    started, skipped = qs[2].start(qs[2].reclaim(1))
    assert started == [] and skipped[0][1].startswith("exhausted")
    job = JobRecord.from_hash(backend.redis_client().hgetall(job_key(job_id)))
    assert job.status == "failed" and "gave up after 2 attempts" in job.error
    # A late finish from a stale worker cannot overwrite the verdict.
    assert qs[1].finish(s1[0], "succeeded", JobResult(), images=[b"x"]) is False


def test_release_hands_unstarted_jobs_back(backend):
    model = f"unit-{uuid.uuid4().hex[:6]}"
    a, b = _wq(backend, model, "A"), _wq(backend, model, "B")
    ids = [j for j, _ in _enqueue(backend.redis_url, model, n=2)]
    got = a.read(2, block_ms=100)
    assert [d.job_id for d in got] == ids
    a.release(got)
    again = b.read(2, block_ms=100)
    assert [d.job_id for d in again] == ids
    assert backend.redis_client().xpending(stream_key(model), "workers")["pending"] == 2


def test_requeue_hands_started_jobs_back_unrun_without_counting_the_attempt(backend):
    model = f"unit-{uuid.uuid4().hex[:6]}"
    a, b = _wq(backend, model, "A", vis=0.05), _wq(backend, model, "B", vis=0.05)
    ids = [j for j, _ in _enqueue(backend.redis_url, model, n=3)]
    started, _ = a.start(a.read(3, block_ms=100))
    r = backend.redis_client()
    r.hset(job_key(ids[1]), "cancel", "1")  # its client asked to cancel it while it ran
    time.sleep(0.1)
    taken, _ = b.start(b.reclaim(1))  # the first job looked dead and B took it over
    assert [j.delivery.job_id for j in taken] == [ids[0]]
    assert a.requeue(started) == 1  # only the last one is still A's to hand back
    back = JobRecord.from_hash(r.hgetall(job_key(ids[2])))
    assert back.status == "queued" and back.attempts == 0 and back.step == 0, back
    assert JobRecord.from_hash(r.hgetall(job_key(ids[1]))).status == "cancelled"
    assert r.lrange(done_key(ids[1]), 0, -1) == [b"cancelled"]
    assert JobRecord.from_hash(r.hgetall(job_key(ids[0]))).status == "running"  # B's, untouched
    again = b.read(3, block_ms=100)
    assert [d.job_id for d in again] == [ids[2]]
    restarted, _ = b.start(again)
    assert restarted[0].attempt == 1
    # Pending: B's takeover and B's new read; nothing of A's is left.
    pending = r.xpending_range(stream_key(model), "workers", "-", "+", 10)
    assert sorted(p["consumer"].decode() for p in pending) == ["B", "B"]


def test_enqueue_depth_limit_and_idempotency(backend):
    model = f"unit-{uuid.uuid4().hex[:6]}"
    (first, created), (second, created2) = _enqueue(backend.redis_url, model, n=2, idem="same")
    assert created and not created2 and first == second
    _enqueue(backend.redis_url, model, n=1, max_queue=2)
    with pytest.raises(QueueFull):
        _enqueue(backend.redis_url, model, n=1, max_queue=2)


def test_a_resent_enqueue_script_queues_the_job_once(backend, monkeypatch):
    # A client that loses the reply to the enqueue script sends it again with the same
    # arguments, the same job id among them; two calls drawing one id replay exactly that.
    import service.broker.producer as producer

    model = f"unit-{uuid.uuid4().hex[:6]}"
    fixed = producer.new_job_id(model)
    monkeypatch.setattr(producer, "new_job_id", lambda m: fixed)
    assert _enqueue(backend.redis_url, model, n=2) == [(fixed, True), (fixed, True)]
    r = backend.redis_client()
    assert r.xlen(stream_key(model)) == 1
    assert r.hget(job_key(fixed), "status") == b"queued"


def test_live_workers_are_read_from_heartbeats_and_garbage_is_skipped(backend):
    from service.broker.wire import LiveWorker
    from service.broker.keys import worker_key, workers_key

    model = f"unit-{uuid.uuid4().hex[:6]}"
    _wq(backend, model, "hb-1").heartbeat({"id": "hb-1", "host": "h", "running": 2,
                                            "models": {model: {"device": "cpu"}}})
    r = backend.redis_client()
    r.zadd(workers_key(model), {"ghost": time.time()})
    r.set(worker_key("ghost"), b"not json")

    async def go():
        client = redis_conn.async_client(backend.redis_url)
        try:
            q = JobQueue(client, max_queue=10, ttl_s=60)
            return await q.ping(), await q.live_workers([model])
        finally:
            await client.aclose()

    alive, workers = asyncio.run(go())
    assert alive and workers == [LiveWorker("hb-1", "h", 2, {model: {"device": "cpu"}})]
