"""Worker behaviour with real processes: batching, takeover after SIGKILL, SIGTERM, webhooks."""

from __future__ import annotations

import json
import signal
import time

from tests.support import Service, wait_until, webhook_receiver
from service.broker.keys import stream_key, workers_key

from service.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify


def _submit(c, **body):
    r = c.post("/generate", json={"prompt": "p", **body}, headers={"Prefer": "respond-async"})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _final(c, job_id, timeout=30):
    return wait_until(lambda: (j := c.get(f"/jobs/{job_id}").json())["status"] in
                      ("succeeded", "failed", "cancelled") and j, timeout=timeout, what=f"job {job_id}")


def test_batching_groups_only_compatible_jobs(service):
    with service.client() as c:
        same = [_submit(c, model="batch", prompt=f"s{i}", seed=i) for i in range(3)]
        bigger = [_submit(c, model="batch", width=24, height=24, seed=i) for i in range(2)]
        other_cache = _submit(c, model="batch", cache={"mode": "fora"})
        other_steps = _submit(c, model="batch", steps=3)
        with_negative = _submit(c, model="batch", negative_prompt="blurry")
        worker = service.start_worker("batch", {"CLUSCA_MAX_BATCH": "8"})
        try:
            jobs = {j: _final(c, j) for j in [*same, *bigger, other_cache, other_steps, with_negative]}
        finally:
            Service.stop(worker)
    assert all(j["status"] == "succeeded" for j in jobs.values())
    assert [jobs[j]["batch_images"] for j in same] == [3, 3, 3]
    assert [jobs[j]["batch_images"] for j in bigger] == [2, 2]
    assert jobs[other_cache]["batch_images"] == jobs[other_steps]["batch_images"] == 1
    assert jobs[with_negative]["batch_images"] == 1
    # Batching does not change what a job gets: image k of job i depends on its own seed only.
    with service.client() as c:
        alone = c.post("/generate", json={"prompt": "s1", "seed": 1}).json()
        batched = c.get(f"/jobs/{same[1]}/images/0").content
    import base64

    assert base64.b64decode(alone["images"][0]) == batched


def test_batch_respects_max_batch_images(service):
    with service.client() as c:
        ids = [_submit(c, model="batch", prompt=f"m{i}", num_images=2) for i in range(3)]
        worker = service.start_worker("batch", {"CLUSCA_MAX_BATCH": "4"})
        try:
            sizes = [_final(c, j)["batch_images"] for j in ids]
        finally:
            Service.stop(worker)
    assert sorted(sizes) == [2, 4, 4]


def test_sigkilled_worker_job_finishes_on_another(service):
    with service.client() as c:
        a = service.start_worker("kill")
        job = _submit(c, model="kill", prompt="survive", seed=9)
        wait_until(lambda: c.get(f"/jobs/{job}").json()["step"] >= 2, what="job running on worker A")
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        b = service.start_worker("kill")
        try:
            final = _final(c, job, timeout=40)
        finally:
            Service.stop(b)
        assert final["status"] == "succeeded" and final["attempts"] == 2
        with c.stream("GET", f"/jobs/{job}/events") as r:
            text = "".join(r.iter_text())
        assert text.count("event: started") == 2 and text.count("event: finished") == 1
        img = c.get(f"/jobs/{job}/images/0")
        assert img.status_code == 200
    r = service.redis_client()
    assert r.xpending(stream_key("kill"), "workers")["pending"] == 0


def test_sigterm_hands_the_running_job_back_within_a_step_then_exits(service):
    with service.client() as c:
        w = service.start_worker("kill")
        running = _submit(c, model="kill", prompt="hand me back", steps=40)
        wait_until(lambda: c.get(f"/jobs/{running}").json()["step"] >= 1, what="job running")
        waiting = _submit(c, model="kill", prompt="later", steps=5)
        t0 = time.monotonic()
        w.send_signal(signal.SIGTERM)
        assert w.wait(30) == 0
        # 40 steps of 0.15 s would take 6 s; the call is stopped within one instead.
        assert time.monotonic() - t0 < 4
        back = c.get(f"/jobs/{running}").json()
        assert back["status"] == "queued" and back["attempts"] == 0, back
        assert c.get(f"/jobs/{waiting}").json()["status"] == "queued"
        w2 = service.start_worker("kill")
        try:
            final = _final(c, running, timeout=40)
            assert _final(c, waiting)["status"] == "succeeded"
        finally:
            Service.stop(w2)
        # Handing back cost the job no attempt: it ran once to the end.
        assert final["status"] == "succeeded" and final["attempts"] == 1, final
        with c.stream("GET", f"/jobs/{running}/events") as r:
            text = "".join(r.iter_text())
        assert text.count("event: started") == 2 and text.count("event: queued") == 2, text
        assert text.count("event: finished") == 1


def test_signed_webhook_on_completion(service):
    with webhook_receiver() as (hook, received):
        with service.client() as c:
            job = c.post("/generate", json={"prompt": "hook", "seed": 4, "webhook_url": f"{hook}/done"}).json()
        wait_until(lambda: received, timeout=10, what="webhook")
    headers, body = received[0]
    payload = json.loads(body)
    assert payload["id"] == job["id"] and payload["status"] == "succeeded" and payload["seed"] == 4
    assert payload["image_urls"] == [f"/jobs/{job['id']}/images/0"]
    assert verify("test-webhook-secret", headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
    assert not verify("wrong-secret", headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
    assert not verify("test-webhook-secret", headers[TIMESTAMP_HEADER], body + b" ", headers[SIGNATURE_HEADER])
    assert abs(int(headers[TIMESTAMP_HEADER]) - time.time()) < 60


def test_redis_outage_503_then_recovery_without_losing_jobs(service, tmp_path):
    import httpx
    import redis as redis_lib

    from service.broker.embedded import EmbeddedRedis

    data = tmp_path / "redis-data"
    data.mkdir()
    own = EmbeddedRedis(persistent=True, data_dir=str(data)).start()
    env = {"REDIS_URL": own.url}
    try:
        worker = service.start_worker("slow", env, wait=False)
        api, url = service.start_api(env)
        r = redis_lib.Redis.from_url(own.url)
        wait_until(lambda: r.zcard(workers_key("slow")) > 0, timeout=30, what="worker heartbeat")
        with httpx.Client(base_url=url, timeout=30) as c:
            running = c.post("/generate", json={"prompt": "outage", "model": "slow", "steps": 15},
                             headers={"Prefer": "respond-async"}).json()["id"]
            wait_until(lambda: c.get(f"/jobs/{running}").json()["step"] >= 1, what="job running")
            own.stop(remove_data=False)
            t0 = time.monotonic()
            down = c.post("/generate", json={"prompt": "x", "model": "slow"})
            assert down.status_code == 503 and down.json()["error"]["code"] == "unavailable"
            assert c.get(f"/jobs/{running}").status_code == 503
            assert c.get("/readyz").status_code == 503
            assert time.monotonic() - t0 < 10
            time.sleep(2.0)  # the job's remaining steps run while Redis is away
            own.start()
            final = wait_until(lambda: _status_or_none(c, running), timeout=40, what="job after the outage")
            assert final["status"] == "succeeded" and final["attempts"] == 1
            again = c.post("/generate", json={"prompt": "after", "model": "slow", "steps": 2})
            assert again.status_code == 200 and again.json()["status"] == "succeeded"
        Service.stop(api)
        assert Service.stop(worker) == 0
    finally:
        own.stop()


def _status_or_none(c, job_id):
    r = c.get(f"/jobs/{job_id}")
    if r.status_code != 200:
        return None
    j = r.json()
    return j if j["status"] in ("succeeded", "failed", "cancelled") else None


def test_torch_threads_setting_applies_when_a_worker_loads_models(service):
    import torch

    from service.registry import Registry
    from service.settings import Settings
    from service.worker.loop import Worker

    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    settings = Settings.from_env({"REDIS_URL": service.redis_url, "CLUSCA_TORCH_THREADS": str(wanted)})
    worker = Worker(settings, Registry.load(None), ["shapes"])
    try:
        worker.load()
        assert torch.get_num_threads() == wanted
        # Unset, a worker runs on one thread: what holds up on a CPU shared with other work.
        torch.set_num_threads(2)
        Worker(Settings.from_env({"REDIS_URL": service.redis_url}), Registry.load(None), ["shapes"]).load()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
