"""Bad input gets the right 4xx with a message naming the problem; nothing reaches a worker."""

from __future__ import annotations

import pytest

from tests.support import Service
from service.broker.keys import JOB_PATTERN, stream_key


def _err(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"]
    assert "Traceback" not in r.text
    return body["error"]


@pytest.mark.parametrize("payload,field,fragment", [
    ({"prompt": "x", "width": 2048}, "width", "at most 1024"),
    ({"prompt": "x", "width": 1024, "height": 1024}, "width", "pixels exceeds the limit"),
    ({"prompt": "x", "width": 20}, "width", "multiple of 8"),
    ({"prompt": "x", "steps": 51}, "steps", "at most 50"),
    ({"prompt": "x", "steps": 0}, "steps", "greater than or equal to 1"),
    ({"prompt": "x", "num_images": 5}, "num_images", "at most 4"),
    ({"prompt": "x" * 501}, "prompt", "limit is 500"),
    ({"prompt": "bad\x00byte"}, "prompt", "control characters"),
    ({"prompt": "x", "guidance": -1}, "guidance", "greater than or equal to 0"),
    ({"prompt": "x", "seed": -5}, "seed", "greater than or equal to 0"),
    ({"prompt": "x", "output_format": "gif"}, "output_format", "png"),
    ({"prompt": "x", "colour": "red"}, "colour", "not a known field"),
    ({}, "prompt", "required"),
    ({"prompt": 5}, "prompt", "string"),
    ({"prompt": "x", "cache": {"interval": 0}}, "cache.interval", "greater than or equal to 1"),
    ({"prompt": "x", "cache": {"mode": "turbo"}}, "cache.mode", "off"),
    ({"prompt": "x", "cache": {"preset": "ludicrous"}}, "cache.preset", "balanced"),
    ({"prompt": "x", "cache": {"bogus_knob": 1}}, "cache.bogus_knob", "unknown setting"),
    ({"prompt": "x", "cache": {"guidance_pairs": "sometimes"}}, "cache.guidance_pairs", "boolean"),
    ({"prompt": "x", "cache": {"capture": "always"}}, "cache.capture", "'auto' or 'off'"),
    ({"prompt": "x", "cache": {"predictor": "spline"}}, "cache.predictor", "'taylor' or 'hermite'"),
    ({"prompt": "x", "cache": {"hermite_scale": 0}}, "cache.hermite_scale", "greater than 0"),
    ({"prompt": "x", "cache": {"modules": {"attention": ["(a+)+$"]}}}, "cache.modules", "operator"),
    ({"prompt": "x", "webhook_url": "ftp://example.com/x"}, "webhook_url", "http"),
    ({"prompt": "x", "model": "../../etc/passwd"}, "model", "pattern"),
])
def test_bad_generate_inputs_name_the_field(service, payload, field, fragment):
    with service.client() as c:
        err = _err(c.post("/generate", json=payload), 422)
    assert err["param"] == field, err
    assert fragment in err["message"], err


def test_unknown_model_is_404_listing_known_models(service):
    with service.client() as c:
        err = _err(c.post("/generate", json={"prompt": "x", "model": "sdxl"}), 404)
    assert err["code"] == "model_not_found" and "noop" in err["known_models"] and "noop" in err["message"]


@pytest.mark.parametrize("raw", [b'{"prompt": "x", "guidance": NaN}', b'{"prompt": "x", "guidance": Infinity}',
                                 b'{"prompt": "x", "cache": {"gamma": NaN}}'])
def test_nan_and_infinity_rejected(service, raw):
    with service.client() as c:
        err = _err(c.post("/generate", content=raw, headers={"Content-Type": "application/json"}), 422)
    assert "finite" in err["message"]


def test_malformed_bodies(service):
    with service.client() as c:
        assert "not valid JSON" in _err(c.post("/generate", content=b"{nope",
                                                headers={"Content-Type": "application/json"}), 422)["message"]
        deep = b"[" * 5000 + b"]" * 5000
        # Every malformed body gets the same answer: a 422 naming the body, whatever the parser tripped on.
        for raw, reason in ((deep, "nested too deeply"), (b'{"prompt":"\xff\xfe"}', "not UTF-8"),
                            (b'{"prompt":"x","seed":' + b"9" * 5000 + b"}", "too many digits"),
                            (b"{nope", "double quotes")):
            err = _err(c.post("/generate", content=raw, headers={"Content-Type": "application/json"}), 422)
            assert err["code"] == "validation_error" and err["param"] == "body", err
            assert err["fields"] == [{"field": "body", "message": err["message"][len("body: "):]}], err
            assert "not valid JSON" in err["message"] and reason in err["message"], err
        _err(c.post("/generate", content=b"prompt=x", headers={"Content-Type": "text/plain"}), 422)
        err = _err(c.post("/generate", content=b'{"prompt": "' + b"x" * 70000 + b'"}',
                          headers={"Content-Type": "application/json"}), 413)
        assert err["code"] == "body_too_large" and "65536" in err["message"]


def test_unicode_prompt_is_fine(service):
    with service.client() as c:
        r = c.post("/generate", json={"prompt": "un cercle rouge \u2764\ufe0f \u6f22\u5b57 \U0001f600\n\ttab"})
    assert r.status_code == 200 and r.json()["status"] == "succeeded"


def test_job_routes_validate_ids(service):
    with service.client() as c:
        assert _err(c.get("/jobs/not-a-job"), 422)["param"] == "job_id"
        assert _err(c.get("/jobs/" + "0" * 32), 404)["code"] == "job_not_found"
        assert _err(c.post("/jobs/" + "0" * 32 + "/cancel"), 404)["code"] == "job_not_found"
        assert _err(c.get("/jobs/" + "0" * 32 + "/events"), 404)["code"] == "job_not_found"
        assert _err(c.get("/nowhere"), 404)["code"] == "not_found"
        assert _err(c.get("/generate"), 405)["code"] == "method_not_allowed"


def test_rejected_requests_never_reach_a_worker(service):
    r = service.redis_client()
    before = r.xlen(stream_key("noop")) + int(r.xpending(stream_key("noop"), "workers")["pending"])
    keys_before = len(list(r.scan_iter(JOB_PATTERN)))
    with service.client() as c:
        for payload in ({"prompt": "x", "steps": 999}, {"prompt": "x", "width": 7}, {"prompt": "\x07"}):
            assert c.post("/generate", json=payload).status_code == 422
    assert len(list(r.scan_iter(JOB_PATTERN))) == keys_before
    assert r.xlen(stream_key("noop")) + int(r.xpending(stream_key("noop"), "workers")["pending"]) <= before


@pytest.fixture(scope="module")
def restricted(service):
    """An API with keys, a tiny queue and private webhooks refused."""
    proc, url = service.start_api({"CLUSCA_API_KEYS": "k-one,k-two", "CLUSCA_MAX_QUEUE": "2",
                                   "CLUSCA_WEBHOOK_ALLOW_PRIVATE": "0"})
    yield url
    Service.stop(proc)


def test_bearer_auth(service, restricted):
    import httpx

    with httpx.Client(base_url=restricted, timeout=30) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic azpvbmU="},
                        {"Authorization": "Bearer k-one-but-longer"}):
            r = c.post("/generate", json={"prompt": "x"}, headers=headers)
            err = _err(r, 401)
            assert err == {"code": "unauthorized", "message": "unauthorized", "param": None}
            assert r.headers["www-authenticate"] == "Bearer"
        assert _err(c.get("/jobs/" + "0" * 32), 401)
        assert c.get("/models", headers={"Authorization": "Bearer k-two"}).status_code == 200
        ok = c.post("/generate", json={"prompt": "x"}, headers={"Authorization": "Bearer k-one"})
        assert ok.status_code == 200 and ok.json()["status"] == "succeeded"
        # Probes and metrics stay open for orchestrators.
        assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200


def test_full_queue_is_429_with_retry_after(service, restricted):
    import httpx

    auth = {"Authorization": "Bearer k-one", "Prefer": "respond-async"}
    r = service.redis_client()
    r.delete(stream_key("orphan"))
    with httpx.Client(base_url=restricted, timeout=30) as c:
        ids = [c.post("/generate", json={"prompt": f"q{i}", "model": "orphan"}, headers=auth) for i in range(2)]
        assert [x.status_code for x in ids] == [202, 202]
        full = c.post("/generate", json={"prompt": "q3", "model": "orphan"}, headers=auth)
        err = _err(full, 429)
        assert err["code"] == "queue_full" and "orphan" in err["message"]
        assert int(full.headers["retry-after"]) > 0
        # Accepted jobs are still there.
        for x in ids:
            assert c.get(f"/jobs/{x.json()['id']}", headers=auth).json()["status"] == "queued"
    r.delete(stream_key("orphan"))


def test_private_webhook_targets_refused(service, restricted):
    import httpx

    with httpx.Client(base_url=restricted, timeout=30) as c:
        for url in ("http://127.0.0.1:9/hook", "http://10.1.2.3/hook", "http://169.254.169.254/latest/meta-data",
                    "http://[::1]/hook", "http://localhost/hook", "http://[::ffff:127.0.0.1]/x"):
            err = _err(c.post("/generate", json={"prompt": "x", "webhook_url": url},
                              headers={"Authorization": "Bearer k-one"}), 422)
            assert err["param"] == "webhook_url" and "private" in err["message"]


def test_redis_down_is_503_not_500_or_hang(service):
    import time

    import httpx

    from service.broker.embedded import free_port

    proc, url = service.start_api({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    try:
        with httpx.Client(base_url=url, timeout=15) as c:
            t0 = time.monotonic()
            for method, path, body in (("POST", "/generate", {"prompt": "x"}), ("GET", "/jobs/" + "0" * 32, None),
                                       ("GET", "/models", None), ("POST", "/v1/images/generations", {"prompt": "x"})):
                r = c.request(method, path, json=body)
                err = _err(r, 503)
                assert err["code"] == "unavailable" and r.headers["retry-after"]
            assert time.monotonic() - t0 < 10
            assert c.get("/readyz").status_code == 503 and c.get("/healthz").status_code == 200
            assert c.get("/metrics").status_code == 200
            # Validation still answers without Redis.
            assert c.post("/generate", json={"prompt": "x", "steps": 0}).status_code == 422
    finally:
        Service.stop(proc)
