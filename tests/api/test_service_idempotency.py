"""Idempotency-Key as the IETF httpapi draft describes it, over real HTTP and Redis.

The same key with the same request is the same job (never a second run, also while the
first is still running); the same key with a different request is a 422; keys are scoped
per API key; the structured-field spelling ``"key"`` and the bare one name the same key.
"""

from __future__ import annotations

import uuid

import httpx
import pytest

from service.broker.keys import JOB_PATTERN


def _key() -> str:
    return f"k-{uuid.uuid4().hex}"


def _started(c: httpx.Client, job_id: str) -> int:
    with c.stream("GET", f"/jobs/{job_id}/events") as r:
        return sum(1 for line in r.iter_lines() if line == "event: started")


def test_same_key_different_request_is_422_and_queues_nothing(service):
    key, r = _key(), service.redis_client()
    with service.client() as c:
        first = c.post("/generate", json={"prompt": "one", "seed": 1}, headers={"Idempotency-Key": key})
        assert first.status_code == 200
        jobs_before = len(list(r.scan_iter(JOB_PATTERN)))
        for changed in ({"prompt": "two", "seed": 1}, {"prompt": "one", "seed": 2}, {"prompt": "one", "seed": 1, "steps": 3},
                        {"prompt": "one", "seed": 1, "model": "slow"}):
            again = c.post("/generate", json=changed, headers={"Idempotency-Key": key})
            assert again.status_code == 422, (changed, again.text)
            err = again.json()["error"]
            assert err["code"] == "idempotency_key_reused" and err["param"] == "Idempotency-Key", err
            assert "different request" in err["message"]
        assert len(list(r.scan_iter(JOB_PATTERN))) == jobs_before
        # The original request with its key still answers with the original job.
        same = c.post("/generate", json={"prompt": "one", "seed": 1}, headers={"Idempotency-Key": key})
        assert same.status_code == 200 and same.json()["id"] == first.json()["id"]


def test_same_request_spelled_differently_is_the_same_request(service):
    key = _key()
    with service.client() as c:
        a = c.post("/generate", json={"prompt": "defaults"}, headers={"Idempotency-Key": key}).json()
        # Defaults written out, the answer wanted asynchronously, the key quoted: still the same request.
        b = c.post("/generate", json={"prompt": "defaults", "num_images": 1, "output_format": "png", "model": "noop",
                                      "async": True}, headers={"Idempotency-Key": f'"{key}"'})
        assert b.status_code == 202 and b.json()["id"] == a["id"]
        # A random seed drawn for the first request does not make the repeat a different request.
        assert b.json()["seed"] == a["seed"]


def test_retry_while_in_flight_gets_the_same_job_and_one_run(service):
    key = _key()
    body = {"prompt": "long", "model": "slow", "steps": 8}
    with service.client() as c:
        a = c.post("/generate", json=body, headers={"Idempotency-Key": key, "Prefer": "respond-async"})
        b = c.post("/generate", json=body, headers={"Idempotency-Key": key, "Prefer": "respond-async"})
        assert a.status_code == b.status_code == 202
        assert b.json()["id"] == a.json()["id"] and b.json()["status"] in ("queued", "running")
        done = c.post("/generate", json=body, headers={"Idempotency-Key": key})  # synchronous: waits for it
        assert done.status_code == 200 and done.json()["id"] == a.json()["id"] and done.json()["attempts"] == 1
        assert _started(c, a.json()["id"]) == 1


def test_openai_endpoint_honours_the_key(service):
    key = _key()
    with service.client() as c:
        a = c.post("/v1/images/generations", json={"prompt": "sdk", "size": "16x16"}, headers={"Idempotency-Key": key})
        b = c.post("/v1/images/generations", json={"prompt": "sdk", "size": "16x16"}, headers={"Idempotency-Key": key})
        assert a.status_code == b.status_code == 200 and a.json()["id"] == b.json()["id"]
        assert a.json()["data"] == b.json()["data"]
        other = c.post("/v1/images/generations", json={"prompt": "sdk", "size": "24x16"}, headers={"Idempotency-Key": key})
        assert other.status_code == 422 and other.json()["error"]["param"] == "Idempotency-Key"


@pytest.fixture(scope="module")
def keyed(service):
    with service.api({"CLUSCA_API_KEYS": "alice-key,bob-key"}) as url:
        yield url


def test_keys_are_scoped_per_api_key(keyed):
    key = _key()
    alice, bob = {"Authorization": "Bearer alice-key"}, {"Authorization": "Bearer bob-key"}
    with httpx.Client(base_url=keyed, timeout=30) as c:
        a = c.post("/generate", json={"prompt": "mine"}, headers={**alice, "Idempotency-Key": key})
        # The same key from another caller is another key: a new job, and no conflict with Alice's request.
        b = c.post("/generate", json={"prompt": "mine"}, headers={**bob, "Idempotency-Key": key})
        b2 = c.post("/generate", json={"prompt": "something else"}, headers={**bob, "Idempotency-Key": key + "x"})
        a2 = c.post("/generate", json={"prompt": "mine"}, headers={**alice, "Idempotency-Key": key})
    assert a.status_code == b.status_code == b2.status_code == a2.status_code == 200
    assert a.json()["id"] != b.json()["id"] and a2.json()["id"] == a.json()["id"]


def test_bad_keys_are_422(service):
    with service.client() as c:
        for bad in ('""', "x" * 256):
            r = c.post("/generate", json={"prompt": "x"}, headers={"Idempotency-Key": bad})
            assert r.status_code == 422 and r.json()["error"]["param"] in ("Idempotency-Key", "idempotency-key"), r.text


def test_documented():
    from tests.support import ROOT

    text = (ROOT / "docs" / "service.md").read_text()
    section = text[text.index("### Idempotency"):]
    section = section[:section.index("\n### ", 1)]
    for fact in ("422", "409", "same job", "API key", "CLUSCA_RESULT_TTL_S", "fingerprint", "/v1/images/generations"):
        assert fact in section, fact
