"""Error answers say what to do, metrics label them once, and the docs match what the service does."""

from __future__ import annotations

import json
import re

from tests.support import ROOT
from service.registry import builtin_entry

SERVICE_MD = (ROOT / "docs" / "service.md").read_text()


def _counter(text: str, name: str, labels: str) -> float:
    m = re.search(rf"^{name}\{{{re.escape(labels)}\}} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_every_refused_value_counts_as_kind_validation(service):
    with service.client() as c:
        before = c.get("/metrics").text
        assert c.post("/generate", json={"prompt": "x", "steps": 0}).status_code == 422  # the schema's check
        assert c.post("/generate", json={"prompt": "x", "steps": 999}).status_code == 422  # the model's limit
        assert c.post("/generate", json={"prompt": "x", "cache": {"nope": 1}}).status_code == 422  # the cache check
        after = c.get("/metrics").text
    assert _counter(after, "clusca_errors_total", 'kind="validation"') - \
        _counter(before, "clusca_errors_total", 'kind="validation"') == 3
    assert 'kind="validation_error"' not in after


def test_too_large_body_is_counted_under_its_endpoint(service):
    with service.client() as c:
        r = c.post("/generate", content=b'{"prompt": "' + b"x" * 70000 + b'"}',
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        text = c.get("/metrics").text
    assert _counter(text, "clusca_requests_total", 'endpoint="/generate",status="413"') >= 1
    assert 'endpoint="unmatched",status="413"' not in text


def test_wrong_content_type_says_to_send_json(service):
    with service.client() as c:
        r = c.post("/generate", content=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["param"] == "body" and "application/json" in err["message"] and "text/plain" in err["message"]
    assert "dictionary" not in err["message"]


def test_cache_given_as_a_preset_name_suggests_the_object(service):
    with service.client() as c:
        r = c.post("/generate", json={"prompt": "x", "cache": "fast"})
        other = c.post("/generate", json={"prompt": "x", "cache": 3})
    err = r.json()["error"]
    assert r.status_code == 422 and err["param"] == "cache" and '{"preset": "fast"}' in err["message"], err
    assert other.status_code == 422 and '{"preset": ' in other.json()["error"]["message"]


def test_unknown_cache_knob_lists_only_what_a_request_may_set(service):
    with service.client() as c:
        err = c.post("/generate", json={"prompt": "x", "cache": {"bogus_knob": 1}}).json()["error"]
        known = json.loads(re.search(r"known settings are (\[.*\])", err["message"]).group(1).replace("'", '"'))
        assert err["param"] == "cache.bogus_knob" and "modules" not in known
        assert {"preset", "interval", "clusters", "gamma"} <= set(known)
        # Each knob listed is one a request may send (a wrong value is refused for that knob, not as unknown).
        for knob in known:
            r = c.post("/generate", json={"prompt": "x", "cache": {knob: {"not": "valid"}}})
            assert r.status_code == 422 and "unknown setting" not in r.json()["error"]["message"], (knob, r.text)


def test_cancel_answers_match_the_docs(service):
    with service.client() as c:
        queued = c.post("/generate", json={"prompt": "never runs", "model": "orphan"},
                        headers={"Prefer": "respond-async"}).json()
        assert c.post(f"/jobs/{queued['id']}/cancel").status_code == 200
        again = c.post(f"/jobs/{queued['id']}/cancel")
        assert again.status_code == 200 and again.json()["status"] == "cancelled"
        done = c.post("/generate", json={"prompt": "done"}).json()
        finished = c.post(f"/jobs/{done['id']}/cancel")
        assert finished.status_code == 409 and finished.json()["error"]["code"] == "job_finished"
    assert "200 cancelled (queued, or cancelled before)" in SERVICE_MD
    assert "409 succeeded or failed" in SERVICE_MD


def test_documented_job_body_is_the_builtin_models():
    block = SERVICE_MD[SERVICE_MD.index("Every job body"):]
    body = json.loads(re.search(r"```json\n(.*?)```", block, re.S).group(1))
    entry = builtin_entry()
    cfg = entry.cache_config()
    assert body["model"] == "shapes" and body["steps"] == body["step"] == entry.defaults.steps
    assert body["guidance"] == entry.defaults.guidance
    assert (body["width"], body["height"]) == (entry.defaults.width, entry.defaults.height)
    for knob in ("interval", "warmup", "order", "clusters"):
        assert body["cache"][knob] == getattr(cfg, knob), knob
    stats = body["cache_stats"]
    assert stats["full_steps"] == len(cfg.full_steps(entry.defaults.steps))
    assert stats["full_steps"] + stats["cached_steps"] == entry.defaults.steps
