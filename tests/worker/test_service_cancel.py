"""A request never holds its worker: cancel lands within a block, deadlines end jobs, and a
closed synchronous client cancels its job; batch mates of a job that leaves run on."""

from __future__ import annotations

import time

import httpx

from service.broker.embedded import free_port
from tests.support import Service, wait_until

# The "crawl" model's steps take 4 s each, spent in 40 blocks of 0.1 s (tests/support.py).
STEP_S = 4.0


def _submit(c, **body) -> str:
    r = c.post("/generate", json={"model": "crawl", "prompt": "p", "async": True, **body})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _status(c, job_id: str) -> dict:
    return c.get(f"/jobs/{job_id}").json()


def _running(c, job_id: str) -> None:
    wait_until(lambda: _status(c, job_id)["status"] == "running", timeout=60, what=f"job {job_id} running")


def _ended(c, job_id: str, timeout: float = 30) -> dict:
    return wait_until(lambda: (j := _status(c, job_id))["status"] in ("succeeded", "failed", "cancelled") and j,
                      timeout=timeout, what=f"job {job_id} ended")


def _stopped(metrics_url: str, reason: str) -> float:
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith("clusca_jobs_stopped_total{") and 'model="crawl"' in line and f'reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_cancel_lands_within_a_step_and_frees_the_worker(service):
    port = free_port()
    worker = service.start_worker("crawl", metrics_port=port)
    try:
        with service.client() as c:
            job = _submit(c)
            _running(c, job)
            time.sleep(0.5)  # well inside the first step
            t0 = time.monotonic()
            assert c.post(f"/jobs/{job}/cancel").status_code == 202
            done = _ended(c, job)
            landed = time.monotonic() - t0
            assert done["status"] == "cancelled" and done["error"] == "cancelled by the client", done
            # Within one block and a poll, not at the end of the 4 s step.
            assert landed < STEP_S / 2, f"cancel took {landed:.2f} s"
            assert done["step"] == 0, done
            # The worker is free at once: a one-step job that follows it ends in about one step.
            t1 = time.monotonic()
            nxt = _ended(c, _submit(c, steps=1), timeout=60)
            assert nxt["status"] == "succeeded" and time.monotonic() - t1 < 3 * STEP_S, nxt
        assert _stopped(f"http://127.0.0.1:{port}/metrics", "cancelled") == 1
    finally:
        Service.stop(worker)


def test_cancel_mid_batch_leaves_the_batch_mates_running(service):
    with service.client() as c:
        keep = _submit(c, prompt="keep", steps=2)
        drop = _submit(c, prompt="drop", steps=2)
        worker = service.start_worker("crawl")  # started after both are queued: one batch of two
        try:
            _running(c, drop)
            time.sleep(0.5)
            t0 = time.monotonic()
            c.post(f"/jobs/{drop}/cancel")
            dropped = wait_until(lambda: (j := _status(c, drop))["status"] != "running" and j, timeout=30,
                                 what="the cancelled batch mate")
            landed = time.monotonic() - t0
            kept = _ended(c, keep, timeout=60)
        finally:
            Service.stop(worker)
        assert dropped["status"] == "cancelled" and landed < STEP_S / 2, (dropped, landed)
        assert kept["status"] == "succeeded" and kept["batch_images"] == 2, kept
        assert c.get(f"/jobs/{keep}/images/0").status_code == 200


def test_a_job_past_its_deadline_fails_by_name_and_frees_the_worker(service):
    worker = service.start_worker("crawl")
    try:
        with service.client() as c:
            t0 = time.monotonic()
            job = _submit(c, timeout_s=1.5)
            done = _ended(c, job)
            took = time.monotonic() - t0
            assert done["status"] == "failed" and done["error"].startswith("deadline exceeded"), done
            assert "timeout_s of 1.5 s" in done["error"] and done["timeout_s"] == 1.5
            assert took < 1.5 + STEP_S / 2, f"the deadline landed after {took:.2f} s"
            # A job with the server's maximum (the default) runs.
            assert _ended(c, _submit(c, steps=1), timeout=60)["status"] == "succeeded"
            assert _status(c, _submit(c, steps=1))["timeout_s"] == float(service.env.get("CLUSCA_MAX_JOB_S", 1800))
    finally:
        Service.stop(worker)


def _closed_sync_request(service, key: str, **body) -> dict:
    """Send a synchronous request, hang up before it can end, then find its job by its Idempotency-Key."""
    body = {"model": "crawl", "prompt": "p", **body}
    try:
        httpx.post(service.base_url + "/generate", json=body, headers={"Idempotency-Key": key}, timeout=1.5)
    except httpx.TimeoutException:
        pass
    else:
        raise AssertionError("the synchronous call answered before its job could have run")
    with service.client() as c:
        r = c.post("/generate", json={**body, "async": True}, headers={"Idempotency-Key": key})
        assert r.status_code == 202, r.text
        return r.json()


def test_a_closed_synchronous_client_cancels_its_job(service):
    worker = service.start_worker("crawl")
    try:
        with service.client() as c:
            job = _closed_sync_request(service, "closed-1")["id"]
            done = _ended(c, job, timeout=STEP_S * 2)
            assert done["status"] == "cancelled" and done["step"] == 0, done
            # Asked to keep running, a closed client's job runs on to the end.
            kept = _closed_sync_request(service, "closed-2", steps=1, cancel_on_disconnect=False)["id"]
            assert _ended(c, kept, timeout=STEP_S * 4)["status"] == "succeeded"
    finally:
        Service.stop(worker)


def test_a_synchronous_request_past_its_deadline_is_a_408_not_a_5xx(service):
    worker = service.start_worker("crawl")
    try:
        with service.client() as c:
            r = c.post("/generate", json={"model": "crawl", "prompt": "p", "timeout_s": 1})
            err = r.json()["error"]
            assert r.status_code == 408 and err["code"] == "deadline_exceeded" and err["param"] == "timeout_s", r.text
            assert err["message"].startswith("deadline exceeded") and "GET /jobs/" in err["message"]
            r = c.post("/v1/images/generations", json={"model": "crawl", "prompt": "p", "timeout_s": 1})
            assert r.status_code == 408 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    finally:
        Service.stop(worker)


def test_an_openai_call_no_worker_takes_ends_at_its_deadline_with_a_408_and_its_job_cancelled(service):
    # No worker serves "crawl" here: the synchronous OpenAI call waits for the job's own deadline
    # (not the sync timeout) and then cancels it, so that it can never run for nobody.
    with service.client() as c:
        t0 = time.monotonic()
        r = c.post("/v1/images/generations", json={"model": "crawl", "prompt": "p", "timeout_s": 1})
        waited = time.monotonic() - t0
        err = r.json()["error"]
        assert r.status_code == 408 and err["code"] == "deadline_exceeded" and err["param"] == "timeout_s", r.text
        assert "it was cancelled" in err["message"] and waited < 20, (waited, r.text)
        job_id = err["message"].split("job ", 1)[1].split(" ", 1)[0]
        assert _status(c, job_id)["status"] == "cancelled"
