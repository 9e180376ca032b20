"""Step progress from the worker: every step reaches Redis, in few round trips; cancel flags come back."""

from __future__ import annotations

import json
import time

from tests.support import wait_until

from service.contract import JobRequest, JobResult
from service.worker.progress import PROGRESS_INTERVAL_S, ProgressPump, progress_by_job
from service.broker.consumer import Delivery, StartedJob, WorkerQueue
from service.broker.keys import events_key, images_key, job_key, new_job_id
from service.worker.watch import CallWatch

REQ = JobRequest(prompt="p", width=16, height=16, steps=4, guidance=0.0, seed=1)


def _job(r, steps: int) -> StartedJob:
    job_id = new_job_id("noop")
    r.hset(job_key(job_id), mapping={"status": "running", "step": 0, "steps": steps})
    return StartedJob(Delivery("noop", "0-1", job_id), REQ, time.time(), time.time(), 1, False)


def _watch(*jobs: StartedJob) -> tuple[CallWatch, list[str]]:
    """The running call's watch over ``jobs``, and the ids of those it ended, in order."""
    ended: list[str] = []
    return CallWatch(list(jobs), lambda j, status, error: ended.append(j.delivery.job_id)), ended


def _pump(r, interval_s: float) -> ProgressPump:
    q = WorkerQueue(r, worker_id="progress-test", models=["noop"], ttl_s=60, visibility_timeout_s=30,
                    max_attempts=3)
    return ProgressPump(q, interval_s=interval_s)


def _steps(r, job: StartedJob) -> list[int]:
    return [json.loads(f[b"e"])["step"] for _, f in r.xrange(events_key(job.delivery.job_id))]


def _round_trips(r) -> int:
    # Each round trip reads every job's cancel flag once (and nothing else in these tests reads one).
    return int(r.info("commandstats").get("cmdstat_hget", {}).get("calls", 0))


def test_fast_steps_all_arrive_in_order_in_a_few_round_trips(service):
    r = service.redis_client()
    pump = _pump(r, interval_s=0.1)
    a, b = _job(r, 40), _job(r, 40)
    watch, ended = _watch(a, b)
    before = _round_trips(r)
    for step in range(1, 41):  # 40 steps of 5 ms: about 200 ms, two intervals
        pump.publish([a, b], step, 40, watch)
        time.sleep(0.005)
    pump.flush()
    trips = (_round_trips(r) - before) // 2
    assert _steps(r, a) == _steps(r, b) == list(range(1, 41))
    assert r.hget(job_key(a.delivery.job_id), "step") == b"40"
    assert 1 <= trips <= 10, f"{trips} round trips for 40 steps"  # one per step would be 40
    assert ended == []


def test_a_slow_step_is_published_while_the_job_runs(service):
    r = service.redis_client()
    pump = _pump(r, interval_s=0.05)
    job = _job(r, 3)
    pump.publish([job], 1, 3, _watch(job)[0])
    # No flush: the step must go out on its own, within about one interval.
    wait_until(lambda: _steps(r, job) == [1], timeout=2.0, interval=0.01, what="step 1 in Redis")
    time.sleep(0.06)
    pump.publish([job], 2, 3, _watch(job)[0])
    wait_until(lambda: _steps(r, job) == [1, 2], timeout=2.0, interval=0.01, what="step 2 in Redis")
    assert r.hget(job_key(job.delivery.job_id), "step") == b"2"


def test_cancel_flag_reaches_the_running_batch_within_an_interval(service):
    r = service.redis_client()
    pump = _pump(r, interval_s=0.05)
    keep, stop = _job(r, 100), _job(r, 100)
    watch, ended = _watch(keep, stop)
    r.hset(job_key(stop.delivery.job_id), "cancel", "1")
    t0 = time.monotonic()
    step = 0
    while not ended and time.monotonic() - t0 < 2.0:
        step += 1
        pump.publish(watch.live(), step, 100, watch)
        time.sleep(0.005)
    assert ended == [stop.delivery.job_id] and watch.live() == [keep]
    assert time.monotonic() - t0 < 0.5
    pump.flush()


def test_a_job_shorter_than_the_interval_costs_one_round_trip_at_flush(service):
    r = service.redis_client()
    pump = _pump(r, interval_s=10.0)  # the thread would hold these steps back for 10 s
    job = _job(r, 5)
    before = _round_trips(r)
    for step in range(1, 6):
        pump.publish([job], step, 5, _watch(job)[0])
    time.sleep(0.1)
    assert _steps(r, job) == []
    t0 = time.monotonic()
    pump.flush()
    assert time.monotonic() - t0 < 1.0
    assert _steps(r, job) == [1, 2, 3, 4, 5]
    assert _round_trips(r) - before == 1


def test_sse_has_every_step_of_a_fast_job(service):
    # The no-op model's steps take microseconds: one progress event per step all the same.
    with service.client() as c:
        job = c.post("/generate", json={"prompt": "fast", "model": "noop", "steps": 30},
                     headers={"Prefer": "respond-async"}).json()
        with c.stream("GET", f"/jobs/{job['id']}/events") as resp:
            text = "".join(resp.iter_text())
        final = c.get(f"/jobs/{job['id']}").json()
    steps = [json.loads(line[6:])["step"] for line in text.splitlines()
             if line.startswith("data: ") and '"progress"' in line]
    assert steps == list(range(1, 31))
    assert final["status"] == "succeeded" and final["step"] == final["steps"] == 30


def test_cancel_at_the_default_interval_takes_effect_within_it(service):
    r = service.redis_client()
    pump = _pump(r, interval_s=PROGRESS_INTERVAL_S)
    job = _job(r, 1000)
    watch, ended = _watch(job)
    step = 0
    pump.publish([job], 1, 1000, watch)  # the interval starts with this step
    t0 = time.monotonic()
    r.hset(job_key(job.delivery.job_id), "cancel", "1")
    while not ended and time.monotonic() - t0 < 3.0:
        step += 1
        pump.publish(watch.live(), step + 1, 1000, watch)
        time.sleep(0.01)  # 10 ms steps, like the built-in model's
    took = time.monotonic() - t0
    assert ended == [job.delivery.job_id] and watch.all_ended()
    assert took < PROGRESS_INTERVAL_S + 0.2, f"cancel seen after {took:.3f} s"
    pump.flush()


def test_taken_steps_travel_with_the_result_before_the_final_event(service):
    r = service.redis_client()
    pump = _pump(r, interval_s=10.0)
    q = pump.q
    a, b = _job(r, 3), _job(r, 3)
    before = _round_trips(r)
    for step in (1, 2, 3):
        pump.publish([a, b], step, 3, _watch(a, b)[0])
    progress = progress_by_job(pump.take())
    assert pump.take() == []  # taken once: the pump will not send them as well
    pump.flush()
    assert _steps(r, a) == [] and _round_trips(r) == before
    events, step = progress[a.delivery.job_id]
    assert step == 3 and [json.loads(e)["step"] for e in events] == [1, 2, 3]
    assert q.finish(a, "succeeded", JobResult(), images=[b"png"], progress=events, step=step)
    kinds = [json.loads(f[b"e"])["type"] for _, f in r.xrange(events_key(a.delivery.job_id))]
    assert kinds == ["progress", "progress", "progress", "finished"]
    steps = [json.loads(f[b"e"]).get("step") for _, f in r.xrange(events_key(a.delivery.job_id))]
    assert steps[:3] == [1, 2, 3]
    assert r.hget(job_key(a.delivery.job_id), "step") == b"3"
    assert r.hget(images_key(a.delivery.job_id), "0") == b"png"
    # A job another worker already finished gets neither its steps nor a second outcome.
    r.hset(job_key(b.delivery.job_id), "status", "succeeded")
    events_b, step_b = progress[b.delivery.job_id]
    assert not q.finish(b, "succeeded", JobResult(), images=[b"x"], progress=events_b, step=step_b)
    assert r.xlen(events_key(b.delivery.job_id)) == 0
    assert r.hget(job_key(b.delivery.job_id), "step") == b"0"
