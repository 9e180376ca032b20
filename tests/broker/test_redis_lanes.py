"""Cost lanes against a real Redis: a model's long jobs wait in a stream of their own.

Each queue test runs against one server and against a 3-primary Redis Cluster (both of a
model's streams must sit in its slot there, so one read and one script may name both).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from clusca.config import ClusCaConfig

from service.broker import connect as redis_conn
from tests.broker.conftest import Backend
from service.broker.consumer import WorkerQueue
from service.broker.keys import STREAM_PATTERN, job_key, model_tag, stream_key, stream_keys
from service.broker.lanes import LANES, LONG, SHORT, lane_of
from service.broker.producer import JobQueue
from service.broker.wire import QueueFull
from service.contract import JobRecord, JobRequest, JobResult
from service.registry import ModelLimits

SHORT_REQ = JobRequest(prompt="s", width=16, height=16, steps=2, guidance=0.0, seed=1, cache=ClusCaConfig(mode="off"))
LONG_REQ = JobRequest(prompt="l", width=16, height=16, steps=40, guidance=0.0, seed=1, cache=ClusCaConfig(mode="off"))
LIMITS = ModelLimits(long_cost=16 * 16 * 10)




def _model() -> str:
    return f"lane-{uuid.uuid4().hex[:6]}"


def _queue(url: str, calls, max_queue: int = 100):
    """Run ``calls(q)`` (a coroutine function) against a fresh producer; return what it returns."""
    async def go():
        r = redis_conn.async_client(url)
        q = JobQueue(r, max_queue=max_queue, ttl_s=60)
        try:
            return await calls(q)
        finally:
            await r.aclose()

    return asyncio.run(go())


def _enqueue(url: str, model: str, *requests: JobRequest, max_queue: int = 100, idem: str | None = None) -> list[str]:
    async def calls(q):
        return [(await q.enqueue(model, req, idem, lane=lane_of(LIMITS, req)))[0] for req in requests]

    return _queue(url, calls, max_queue)


def _wq(backend: Backend, model: str, wid: str, vis: float = 30, lanes=LANES) -> WorkerQueue:
    q = WorkerQueue(backend.redis_client(), worker_id=wid, models=[model], ttl_s=60, visibility_timeout_s=vis,
                    max_attempts=3, lanes=lanes)
    q.ensure_groups()
    return q


# ---------------------------------------------------------------------------- the choice
def test_lane_is_chosen_by_cost_against_the_models_long_cost():
    assert SHORT_REQ.cost == 16 * 16 * 2 and LONG_REQ.cost == 16 * 16 * 40
    assert lane_of(LIMITS, SHORT_REQ) == SHORT
    assert lane_of(LIMITS, LONG_REQ) == LONG
    at_the_bound = JobRequest(prompt="b", width=16, height=16, steps=10, guidance=0.0, seed=1)
    assert lane_of(LIMITS, at_the_bound) == SHORT  # "more than long_cost" goes long
    more_images = JobRequest(prompt="b", width=16, height=16, steps=10, guidance=0.0, seed=1, num_images=2)
    assert lane_of(LIMITS, more_images) == LONG  # cost counts every image
    assert lane_of(ModelLimits(), LONG_REQ) == SHORT  # no long_cost: one lane, as before lanes
    with pytest.raises(ValueError):
        ModelLimits(long_cost=0)


def test_lanes_share_the_models_slot_and_the_stream_pattern():
    short, long = stream_keys("flux-dev")
    assert short == stream_key("flux-dev") == stream_key("flux-dev", SHORT)
    assert long == stream_key("flux-dev", LONG) == f"clusca:{{{model_tag('flux-dev')}}}:stream:flux-dev:long"
    from fnmatch import fnmatchcase

    assert fnmatchcase(short, STREAM_PATTERN) and fnmatchcase(long, STREAM_PATTERN)
    with pytest.raises(ValueError):
        stream_key("flux-dev", "medium")


# ---------------------------------------------------------------------------- the API side
def test_jobs_are_queued_in_their_lane_and_depth_counts_both(backend):
    model = _model()
    short_id, long_id = _enqueue(backend.redis_url, model, SHORT_REQ, LONG_REQ)
    r = backend.redis_client()
    assert [e[1][b"job"].decode() for e in r.xrange(stream_key(model, SHORT))] == [short_id]
    assert [e[1][b"job"].decode() for e in r.xrange(stream_key(model, LONG))] == [long_id]

    async def depth_and_running(q):
        return await q.depth(model), await q.running(model)

    w = _wq(backend, model, "W")
    assert _queue(backend.redis_url, depth_and_running) == (2, 0)
    (got,) = w.read(4, block_ms=100)  # the short one
    assert _queue(backend.redis_url, depth_and_running) == (1, 1)
    w.read(4, block_ms=100)  # then the long one
    assert _queue(backend.redis_url, depth_and_running) == (0, 2)


def test_the_depth_limit_counts_both_lanes(backend):
    model = _model()
    _enqueue(backend.redis_url, model, LONG_REQ, max_queue=2)
    _enqueue(backend.redis_url, model, SHORT_REQ, max_queue=2)
    with pytest.raises(QueueFull) as full:
        _enqueue(backend.redis_url, model, SHORT_REQ, max_queue=2)
    assert full.value.depth == 2
    with pytest.raises(QueueFull):
        _enqueue(backend.redis_url, model, LONG_REQ, max_queue=2)


def test_an_idempotent_repeat_of_a_long_job_queues_it_once(backend):
    model = _model()
    first, again = _enqueue(backend.redis_url, model, LONG_REQ, LONG_REQ, idem=f"k-{model}")
    assert first == again
    assert backend.redis_client().xlen(stream_key(model, LONG)) == 1


# ---------------------------------------------------------------------------- the worker side
def test_a_worker_reading_both_lanes_takes_short_jobs_first_and_long_ones_singly(backend):
    model = _model()
    long_a, long_b, short_a, short_b = _enqueue(backend.redis_url, model, LONG_REQ, LONG_REQ, SHORT_REQ, SHORT_REQ)
    w = _wq(backend, model, "W")
    first = w.read(4, block_ms=100)
    assert [(d.job_id, d.lane) for d in first] == [(short_a, SHORT), (short_b, SHORT)]
    assert [(d.job_id, d.lane, d.stream) for d in w.read(4, block_ms=100)] == [(long_a, LONG, stream_key(model, LONG))]
    assert [d.job_id for d in w.read(4, block_ms=100)] == [long_b]
    assert w.read(4, block_ms=50) == []


def test_a_blocked_read_wakes_for_a_long_job(backend):
    import threading

    model = _model()
    w = _wq(backend, model, "W")
    later = threading.Timer(0.3, lambda: _enqueue(backend.redis_url, model, LONG_REQ))
    t0 = time.monotonic()
    later.start()
    try:
        got = w.read(4, block_ms=5000)
    finally:
        later.join()
    assert [d.lane for d in got] == [LONG]
    assert 0.25 <= time.monotonic() - t0 < 4


def test_a_short_only_worker_never_takes_a_long_job(backend):
    model = _model()
    (long_id,) = _enqueue(backend.redis_url, model, LONG_REQ)
    short_only = _wq(backend, model, "S", vis=0.05, lanes=(SHORT,))
    assert short_only.read(4, block_ms=100) == []
    time.sleep(0.1)
    assert short_only.reclaim(4) == []  # nor a long job another worker left behind
    (short_id,) = _enqueue(backend.redis_url, model, SHORT_REQ)
    assert [d.job_id for d in short_only.read(4, block_ms=100)] == [short_id]
    r = backend.redis_client()
    assert r.xpending(stream_key(model, LONG), "workers")["pending"] == 0  # never delivered
    assert [d.job_id for d in _wq(backend, model, "W").read(4, block_ms=100)] == [long_id]
    with pytest.raises(ValueError):
        _wq(backend, model, "X", lanes=(LONG,))


def test_a_dead_workers_long_job_is_reclaimed_from_the_long_lane(backend):
    model = _model()
    (long_id,) = _enqueue(backend.redis_url, model, LONG_REQ)
    dead, alive = _wq(backend, model, "dead", vis=0.05), _wq(backend, model, "alive", vis=0.05)
    (d,) = dead.read(1, block_ms=100)
    dead.start([d])
    time.sleep(0.1)
    (taken,) = alive.reclaim(4)
    assert (taken.job_id, taken.lane) == (long_id, LONG)
    (job,), _ = alive.start([taken])
    assert job.attempt == 2
    assert alive.finish(job, "succeeded", JobResult(worker="alive"), images=[b"x"])
    r = backend.redis_client()
    assert r.hget(job_key(long_id), "status") == b"succeeded"
    assert r.xlen(stream_key(model, LONG)) == 0 and r.xpending(stream_key(model, LONG), "workers")["pending"] == 0


def test_release_puts_a_long_job_back_into_the_long_lane(backend):
    model = _model()
    long_id, short_id = _enqueue(backend.redis_url, model, LONG_REQ, SHORT_REQ)
    a = _wq(backend, model, "A")
    got = a.read(1, block_ms=100) + a.read(1, block_ms=100)
    assert [d.lane for d in got] == [SHORT, LONG]
    a.release(got)
    r = backend.redis_client()
    assert [e[1][b"job"].decode() for e in r.xrange(stream_key(model, LONG))] == [long_id]
    assert [e[1][b"job"].decode() for e in r.xrange(stream_key(model, SHORT))] == [short_id]
    b = _wq(backend, model, "B", lanes=(SHORT,))
    assert [d.job_id for d in b.read(4, block_ms=100)] == [short_id]  # the long one is not in the short lane


def test_a_queued_long_job_can_be_cancelled(backend):
    model = _model()
    (long_id,) = _enqueue(backend.redis_url, model, LONG_REQ)

    async def cancel(q):
        return await q.cancel(long_id), await q.get(long_id)

    outcome, job = _queue(backend.redis_url, cancel)
    assert outcome == "cancelled" and job.status == "cancelled"
    w = _wq(backend, model, "W")
    started, skipped = w.start(w.read(1, block_ms=100))
    assert started == [] and skipped[0][1] == "done: cancelled"
    r = backend.redis_client()
    assert r.xlen(stream_key(model, LONG)) == 0  # the entry left with the skip
    assert JobRecord.from_hash(r.hgetall(job_key(long_id))).status == "cancelled"


def test_entries_with_the_same_id_in_both_lanes_stay_apart(backend):
    # Entry ids are unique within a stream only: two lanes may each give one the same id.
    from service.worker.heartbeat import HeldDeliveries

    model = _model()
    short_id, long_id = _enqueue(backend.redis_url, model, SHORT_REQ, LONG_REQ)
    r = backend.redis_client()
    for lane, job_id in ((SHORT, short_id), (LONG, long_id)):
        key = stream_key(model, lane)
        r.xtrim(key, maxlen=0)
        r.xadd(key, {"job": job_id}, id="99999999999999-0")
    w = _wq(backend, model, "W")
    got = w.read(4, block_ms=100) + w.read(4, block_ms=100)
    assert [(d.job_id, d.entry_id) for d in got] == [(short_id, "99999999999999-0"), (long_id, "99999999999999-0")]
    held = HeldDeliveries()
    held.hold(got)
    held.release(got[:1])
    assert held.snapshot() == got[1:]
    known = dict(zip((d.job_id for d in got), w.peek_requests(got)))
    started, _ = w.start(got, known)
    assert [(j.delivery.job_id, j.request.prompt, j.request.steps) for j in started] == [
        (short_id, SHORT_REQ.prompt, SHORT_REQ.steps), (long_id, LONG_REQ.prompt, LONG_REQ.steps)]
    for j in started:
        assert w.finish(j, "succeeded", JobResult(), images=[b"x"])
    assert r.xlen(stream_key(model, SHORT)) == r.xlen(stream_key(model, LONG)) == 0
