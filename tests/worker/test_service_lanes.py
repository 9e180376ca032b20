"""Cost lanes with real processes: a short job is not held up by long ones.

The ``lanes`` test model sleeps 0.1 s a step and sends jobs above 16 x 16 x 10 pixel-steps
to its long lane, so a 40-step job is a 4 s long job and a 2-step one a 0.2 s short job.
"""

from __future__ import annotations

import time

import pytest

from service.broker.keys import job_key, stream_key
from service.broker.lanes import LONG, SHORT
from service.settings import Settings, SettingsError
from tests.support import Service, wait_until

LONG_STEPS = 40


def _submit(c, **body):
    r = c.post("/generate", json={"prompt": "p", "model": "lanes", **body}, headers={"Prefer": "respond-async"})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _status(c, job_id):
    return c.get(f"/jobs/{job_id}").json()["status"]


def _final(c, job_id, timeout=30):
    return wait_until(lambda: (j := c.get(f"/jobs/{job_id}").json())["status"] in
                      ("succeeded", "failed", "cancelled") and j, timeout=timeout, what=f"job {job_id}")


def _lanes_info(c):
    return next(m for m in c.get("/models").json()["models"] if m["name"] == "lanes")


def test_worker_lanes_setting():
    assert Settings.from_env({}).worker_lanes == "all"
    assert Settings.from_env({"CLUSCA_WORKER_LANES": "short"}).worker_lanes == "short"
    with pytest.raises(SettingsError, match="CLUSCA_WORKER_LANES"):
        Settings.from_env({"CLUSCA_WORKER_LANES": "long"})


def test_a_short_job_finishes_promptly_while_long_jobs_hold_the_other_worker(service):
    r = service.redis_client()
    both = service.start_worker("lanes", worker_id="lanes-all")
    short_only = service.start_worker("lanes", {"CLUSCA_WORKER_LANES": "short"}, worker_id="lanes-short")
    try:
        with service.client() as c:
            first_long = _submit(c, steps=LONG_STEPS)
            wait_until(lambda: _status(c, first_long) == "running", what="the long job running")
            second_long = _submit(c, steps=LONG_STEPS)
            assert r.xlen(stream_key("lanes", LONG)) == 2 and r.xlen(stream_key("lanes", SHORT)) == 0
            t0 = time.monotonic()
            short = c.post("/generate", json={"prompt": "quick", "model": "lanes"})
            short_s = time.monotonic() - t0
            assert short.status_code == 200 and short.json()["status"] == "succeeded", short.text
            assert short_s < 2.0, short_s  # a long job takes 4 s; this one did not wait for it
            # The short-only worker ran it and left the second long job waiting for the other worker.
            assert r.hget(job_key(short.json()["id"]), "worker") == b"lanes-short"
            assert _status(c, first_long) == "running" and _status(c, second_long) == "queued"
            info = _lanes_info(c)
            assert (info["queue_depth"], info["running_jobs"]) == (1, 1)  # both lanes counted
            assert info["limits"]["long_cost"] == 16 * 16 * 10
            assert {w["id"]: w["lanes"] for w in info["workers"]} == {"lanes-all": ["short", "long"],
                                                                       "lanes-short": ["short"]}
            finals = [_final(c, j) for j in (first_long, second_long)]
        assert [j["status"] for j in finals] == ["succeeded", "succeeded"]
        assert [r.hget(job_key(j), "worker") for j in (first_long, second_long)] == [b"lanes-all"] * 2
        assert r.xlen(stream_key("lanes", LONG)) == 0
    finally:
        Service.stop(short_only)
        Service.stop(both)


def test_a_worker_reading_both_lanes_runs_a_waiting_short_job_before_an_older_long_one(service):
    r = service.redis_client()
    worker = service.start_worker("lanes", worker_id="lanes-one")
    try:
        with service.client() as c:
            running = _submit(c, steps=12)  # 1.2 s, long (12 x 16 x 16 > 2560)
            wait_until(lambda: _status(c, running) == "running", what="the first long job running")
            older_long = _submit(c, steps=12)
            newer_short = _submit(c, steps=2)
            finals = {j: _final(c, j) for j in (running, older_long, newer_short)}
        assert all(j["status"] == "succeeded" for j in finals.values())
        assert finals[newer_short]["started_at"] < finals[older_long]["started_at"]
        assert r.hget(job_key(older_long), "worker") == r.hget(job_key(newer_short), "worker") == b"lanes-one"
    finally:
        Service.stop(worker)


def test_a_worker_runs_each_job_with_its_own_request_when_two_lanes_give_the_same_entry_id(service):
    # Entry ids are unique within one stream only; the worker must not mistake one lane's job for the other's.
    import asyncio
    import io
    import uuid

    from PIL import Image

    from service.broker import connect as redis_conn
    from service.broker.lanes import lane_of
    from service.broker.producer import JobQueue
    from service.contract import JobRequest
    from service.registry import ModelEntry, Registry
    from service.worker.loop import Worker
    from service.worker.runners.noop_pipeline import noop_color

    model = f"lanes-{uuid.uuid4().hex[:6]}"
    entry = ModelEntry(name=model, kind="noop", defaults={"width": 16, "height": 16, "steps": 2, "guidance": 0,
                                                          "cache": "off", "size_multiple": 8},
                       limits={"long_cost": 16 * 16 * 10})
    short_req = JobRequest(prompt="short one", width=16, height=16, steps=2, guidance=0.0, seed=3, cache={"mode": "off"})
    long_req = JobRequest(prompt="long one", width=16, height=16, steps=12, guidance=0.0, seed=4, cache={"mode": "off"})

    async def enqueue():
        r = redis_conn.async_client(service.redis_url)
        try:
            q = JobQueue(r, max_queue=10, ttl_s=60)
            return [(await q.enqueue(model, req, lane=lane_of(entry.limits, req)))[0] for req in (short_req, long_req)]
        finally:
            await r.aclose()

    worker = Worker(Settings(redis_url=service.redis_url, worker_metrics_port=0, max_batch=4), Registry([entry]))
    worker.load()
    worker.q.ensure_groups()
    short_id, long_id = asyncio.run(enqueue())
    r = service.redis_client()
    for lane, job_id in ((SHORT, short_id), (LONG, long_id)):
        r.xtrim(stream_key(model, lane), maxlen=0)
        r.xadd(stream_key(model, lane), {"job": job_id}, id="99999999999999-0")
    got = worker.q.read(4, block_ms=100) + worker.q.read(4, block_ms=100)
    assert [d.entry_id for d in got] == ["99999999999999-0"] * 2 and [d.lane for d in got] == [SHORT, LONG]
    worker._process(got[::-1])  # handed over long first: the short one still runs first
    worker.results.shutdown()
    for job_id, req in ((short_id, short_req), (long_id, long_req)):
        assert r.hget(job_key(job_id), "status") == b"succeeded"
        image = Image.open(io.BytesIO(r.hget(f"{job_key(job_id)}:images", "0"))).convert("RGB")
        assert image.getpixel((0, 0)) == noop_color(req.prompt, req.seed), job_id
    started = {j: float(r.hget(job_key(j), "started")) for j in (short_id, long_id)}
    assert started[short_id] < started[long_id]


def test_readiness_warns_when_no_live_worker_reads_a_long_lane(service):
    short_only = service.start_worker("lanes", {"CLUSCA_WORKER_LANES": "short"}, worker_id="lanes-only-short")
    try:
        with service.client() as c:
            def warned() -> list[str]:
                ready = c.get("/readyz")
                assert ready.status_code == 200, ready.text
                return [w for w in ready.json()["warnings"] if "'lanes'" in w]
            # Waited for, in case a worker of an earlier test still counts as live.
            got = wait_until(warned, timeout=30, what="the long-lane warning")
            assert len(got) == 1 and "long lane" in got[0] and "2560" in got[0], got
            both = service.start_worker("lanes", worker_id="lanes-reads-all")
            try:
                assert not warned()
            finally:
                Service.stop(both)
    finally:
        Service.stop(short_only)
