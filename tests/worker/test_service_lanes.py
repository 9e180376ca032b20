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
