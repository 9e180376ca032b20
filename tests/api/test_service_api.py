"""End to end through HTTP: generate (sync and async), jobs, images, SSE, idempotency, cancel."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time

import pytest
from PIL import Image

from service.worker.runners.noop_pipeline import noop_color

from tests.support import ROOT, wait_until


def _colour(png: bytes) -> tuple[int, int, int]:
    return Image.open(io.BytesIO(png)).convert("RGB").getpixel((0, 0))


def _sse(client, job_id: str) -> list[tuple[str, dict]]:
    events = []
    with client.stream("GET", f"/jobs/{job_id}/events") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    return events


def test_api_process_imports_no_torch():
    code = ("import sys; from service.api import create_app; from service.settings import Settings; "
            "create_app(Settings(redis_url='redis://127.0.0.1:1/0')); "
            "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_generate_sync_returns_images_seed_timings_and_stats(service):
    with service.client() as c:
        r = c.post("/generate", json={"prompt": "a red circle", "seed": 11, "num_images": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "succeeded" and len(body["id"]) == 32
    assert body["seed"] == 11 and body["seeds"] == [11, 12]
    assert set(body["timings"]) == {"queue_wait_s", "inference_s", "total_s"}
    assert body["timings"]["total_s"] >= body["timings"]["queue_wait_s"] >= 0
    assert body["cache_stats"]["full_steps"] == 4 and body["cache"]["mode"] == "off"
    images = [base64.b64decode(s) for s in body["images"]]
    # Each image depends only on its own seed.
    assert [_colour(b) for b in images] == [noop_color("a red circle", 11), noop_color("a red circle", 12)]
    assert Image.open(io.BytesIO(images[0])).size == (16, 16)


def test_random_seed_is_returned_and_reproduces(service):
    with service.client() as c:
        first = c.post("/generate", json={"prompt": "x"}).json()
        again = c.post("/generate", json={"prompt": "x", "seed": first["seed"]}).json()
    assert isinstance(first["seed"], int)
    assert first["images"] == again["images"]


@pytest.mark.parametrize("fmt,ctype,pil", [("png", "image/png", "PNG"), ("jpeg", "image/jpeg", "JPEG"),
                                           ("webp", "image/webp", "WEBP")])
def test_async_with_prefer_header_then_poll_and_fetch_raw_image(service, fmt, ctype, pil):
    with service.client() as c:
        r = c.post("/generate", json={"prompt": "p", "seed": 5, "output_format": fmt, "width": 24, "height": 32},
                   headers={"Prefer": "respond-async"})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] in ("queued", "running", "succeeded") and job["seed"] == 5
        assert r.headers["location"] == f"/jobs/{job['id']}"
        done = wait_until(lambda: (j := c.get(f"/jobs/{job['id']}").json())["status"] == "succeeded" and j,
                          what="job success")
        assert done["step"] == done["steps"] == 4
        assert done["links"]["images"] == [f"/jobs/{job['id']}/images/0"]
        img = c.get(f"/jobs/{job['id']}/images/0")
        assert img.status_code == 200 and img.headers["content-type"] == ctype
        im = Image.open(io.BytesIO(img.content))
        assert im.format == pil and im.size == (24, 32)
        assert c.get(f"/jobs/{job['id']}/images/1").status_code == 404


def test_async_body_field(service):
    with service.client() as c:
        r = c.post("/generate", json={"prompt": "p", "async": True})
        assert r.status_code == 202 and r.json()["links"]["self"].startswith("/jobs/")


def test_sse_stream_has_queued_started_progress_finished(service):
    with service.client() as c:
        job = c.post("/generate", json={"prompt": "sse", "model": "slow", "steps": 5},
                     headers={"Prefer": "respond-async"}).json()
        events = _sse(c, job["id"])
        # Reading the stream again after the end replays it from the start.
        replay = _sse(c, job["id"])
    kinds = [k for k, _ in events]
    assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "finished"
    progress = [e for k, e in events if k == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3, 4, 5] and all(e["steps"] == 5 for e in progress)
    assert events[-1][1]["status"] == "succeeded"
    assert [k for k, _ in replay] == kinds


def test_idempotency_key_returns_the_same_job_and_runs_once(service):
    key = f"idem-{time.time()}"
    with service.client() as c:
        a = c.post("/generate", json={"prompt": "once", "model": "slow", "steps": 3},
                   headers={"Idempotency-Key": key, "Prefer": "respond-async"})
        b = c.post("/generate", json={"prompt": "once", "model": "slow", "steps": 3},
                   headers={"Idempotency-Key": key})  # synchronous repeat waits for the same job
        other = c.post("/generate", json={"prompt": "once", "model": "slow", "steps": 3},
                       headers={"Idempotency-Key": key + "-other", "Prefer": "respond-async"})
    assert a.status_code == 202 and b.status_code == 200
    assert a.json()["id"] == b.json()["id"] != other.json()["id"]
    assert b.json()["attempts"] == 1
    events = _sse(service.client(), a.json()["id"])
    assert [k for k, _ in events].count("started") == 1


def test_cancel_running_job_stops_at_next_step(service):
    with service.client() as c:
        job = c.post("/generate", json={"prompt": "stop me", "model": "slow", "steps": 40},
                     headers={"Prefer": "respond-async"}).json()
        wait_until(lambda: c.get(f"/jobs/{job['id']}").json()["step"] >= 2, what="job running")
        r = c.post(f"/jobs/{job['id']}/cancel")
        assert r.status_code == 202, r.text
        events = _sse(c, job["id"])
        final = c.get(f"/jobs/{job['id']}").json()
        assert final["status"] == "cancelled" and final["step"] < 40
        assert events[-1][0] == "cancelled"
        assert c.get(f"/jobs/{job['id']}/images/0").status_code == 409
        # Cancelling twice is harmless; cancelling a finished job is a conflict.
        assert c.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        done = c.post("/generate", json={"prompt": "done"}).json()
        r = c.post(f"/jobs/{done['id']}/cancel")
        assert r.status_code == 409 and "succeeded" in r.json()["error"]["message"]


def test_cancel_queued_job(service):
    with service.client() as c:
        job = c.post("/generate", json={"prompt": "never runs", "model": "orphan"},
                     headers={"Prefer": "respond-async"}).json()
        assert job["status"] == "queued"
        r = c.post(f"/jobs/{job['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert [k for k, _ in _sse(c, job["id"])] == ["queued", "cancelled"]


def test_failing_pipeline_fails_the_job_and_worker_keeps_serving(service):
    with service.client() as c:
        r = c.post("/generate", json={"prompt": "explode", "model": "failing"})
        assert r.status_code == 500
        body = r.json()
        assert body["status"] == "failed" and "out of memory" in body["error"]
        ok = c.post("/generate", json={"prompt": "fine", "model": "failing"})
        assert ok.status_code == 200 and ok.json()["status"] == "succeeded"


def test_models_health_ready(service):
    with service.client() as c:
        m = c.get("/models").json()
        assert m["default_model"] == "noop"
        by_name = {x["name"]: x for x in m["models"]}
        assert by_name["noop"]["workers_alive"] >= 1 and by_name["orphan"]["workers_alive"] == 0
        assert by_name["noop"]["defaults"]["steps"] == 4
        assert "path" not in by_name["shapes"]
        assert by_name["noop"]["workers"] and by_name["noop"]["workers"][0]["device"] == "cpu"
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["workers_alive"]["noop"] >= 1
        assert c.get("/openapi.json").status_code == 200


def test_openai_compatible_endpoint(service):
    with service.client() as c:
        r = c.post("/v1/images/generations", json={"prompt": "sdk", "n": 2, "size": "24x16", "seed": 3,
                                                  "response_format": "b64_json", "quality": "standard"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert isinstance(body["created"], int) and len(body["data"]) == 2
        im = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
        assert im.size == (24, 16) and _colour(base64.b64decode(body["data"][1]["b64_json"])) == noop_color("sdk", 4)
        u = c.post("/v1/images/generations", json={"prompt": "sdk", "response_format": "url"}).json()
        url = u["data"][0]["url"]
        assert url.startswith(service.base_url + "/jobs/")
        assert c.get(url).headers["content-type"] == "image/png"
        bad = c.post("/v1/images/generations", json={"prompt": "sdk", "size": "big"})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "size"


def test_metrics_exported_by_api_and_worker(service):
    with service.client() as c:
        c.post("/generate", json={"prompt": "m"})
        api = c.get("/metrics").text
    for name in ("clusca_requests_total", "clusca_queue_depth", "clusca_running_jobs", "clusca_workers_alive"):
        assert name in api
    assert 'clusca_requests_total{endpoint="/generate",status="200"}' in api
    assert 'clusca_workers_alive{model="noop"} 1.0' in api
    import httpx

    worker = httpx.get(service.worker_metrics_url).text
    for name in ("clusca_request_latency_seconds_bucket", "clusca_queue_wait_seconds_bucket",
                 "clusca_inference_seconds_bucket", "clusca_step_seconds_bucket", "clusca_images_generated_total",
                 "clusca_token_fraction_bucket", "clusca_flops_speedup_bucket", "clusca_graph_replays_total",
                 "clusca_worker_heartbeat_timestamp_seconds"):
        assert name in worker, name


def test_sse_resumes_after_last_event_id(service):
    with service.client() as c:
        job = c.post("/generate", json={"prompt": "resume", "steps": 3}).json()
        ids = []
        with c.stream("GET", f"/jobs/{job['id']}/events") as r:
            ids = [line[4:] for line in r.iter_lines() if line.startswith("id: ")]
        with c.stream("GET", f"/jobs/{job['id']}/events", headers={"Last-Event-ID": ids[1]}) as r:
            rest = [line[4:] for line in r.iter_lines() if line.startswith("id: ")]
        assert rest == ids[2:] and len(ids) == 6  # queued, started, 3 x progress, finished
        bad = c.get(f"/jobs/{job['id']}/events", headers={"Last-Event-ID": "99999999999999999999999-0"})
        assert bad.status_code == 422


def test_pipeline_with_legacy_callback_reports_progress_and_cancels(service):
    with service.client() as c:
        done = c.post("/generate", json={"prompt": "old api", "model": "legacy", "steps": 3}).json()
        assert done["status"] == "succeeded" and done["step"] == 3
        job = c.post("/generate", json={"prompt": "old api", "model": "legacy", "steps": 40},
                     headers={"Prefer": "respond-async"}).json()
        wait_until(lambda: c.get(f"/jobs/{job['id']}").json()["step"] >= 2, what="legacy job running")
        assert c.post(f"/jobs/{job['id']}/cancel").status_code == 202
        final = wait_until(lambda: (j := c.get(f"/jobs/{job['id']}").json())["status"] != "running" and j,
                           what="legacy job stopped")
        assert final["status"] == "cancelled" and final["step"] < 40
