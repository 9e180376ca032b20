"""Hostile input: each gets the right 4xx with a message and never reaches a worker.

Also: model names stay dictionary keys (no filesystem access), webhook targets are
checked against loopback/private ranges (SSRF) at request time and again at delivery,
nothing read from Redis is unpickled, and API keys are compared in constant time and
never written to logs or Redis.
"""

from __future__ import annotations

import ast
import http.server
import json
import logging
import os
import pickle
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT, Service, wait_until
from service.broker.keys import JOB_PATTERN, STREAM_PATTERN, job_key, model_tag, stream_key
from tests.reliability.reliability_support import ledger_problems, stack, submit

SECRET_KEYS = ("sk-live-4f1c0ffee", "second-key-77ab", "third-key-zz")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A private stack: one noop worker, one API refusing private webhooks."""
    tmp = tmp_path_factory.mktemp("hostile")
    with stack(tmp, extra_env={"CLUSCA_WEBHOOK_ALLOW_PRIVATE": "0"}) as svc:
        svc.start_worker("noop,slow,failing")
        _, svc.base_url = svc.start_api()
        yield svc


def _queued_state(r) -> tuple:
    """Everything a worker could ever receive: stream lengths, last ids added and delivered, job records."""
    streams = sorted(r.scan_iter(STREAM_PATTERN))
    state = [(k, r.xlen(k), r.xinfo_stream(k)["last-generated-id"],
              tuple(g["last-delivered-id"] for g in r.xinfo_groups(k))) for k in streams]
    jobs = sum(1 for k in r.scan_iter(JOB_PATTERN) if k.count(b":") == 3)
    return tuple(state), jobs


def _err(resp: httpx.Response, status: int | tuple[int, ...]) -> dict:
    statuses = (status,) if isinstance(status, int) else status
    assert resp.status_code in statuses, (resp.status_code, resp.text[:500])
    assert "Traceback" not in resp.text
    err = resp.json()["error"]
    assert isinstance(err["message"], str) and err["message"].strip()
    return err


JSON = {"Content-Type": "application/json"}
DEEP = 30_000  # 60 kB: under the body limit, far over any parser's nesting depth

# (id, raw body, headers, expected status(es), expected param or None, fragment of the message or None)
HOSTILE = [
    ("huge-side", b'{"prompt":"x","width":16384,"height":16}', JSON, 422, "width", "at most"),
    ("huge-area", b'{"prompt":"x","width":1024,"height":1024}', JSON, 422, "width", "pixels exceeds"),
    ("side-overflow", b'{"prompt":"x","width":1' + b"0" * 30 + b'}', JSON, 422, "width", None),
    ("negative-side", b'{"prompt":"x","width":-16}', JSON, 422, "width", None),
    ("steps-absurd", b'{"prompt":"x","steps":1000000000}', JSON, 422, "steps", None),
    ("steps-2^63", b'{"prompt":"x","steps":9223372036854775808}', JSON, 422, "steps", None),
    ("steps-float", b'{"prompt":"x","steps":10.5}', JSON, 422, "steps", None),
    ("steps-zero", b'{"prompt":"x","steps":0}', JSON, 422, "steps", None),
    ("steps-over-limit", b'{"prompt":"x","steps":51}', JSON, 422, "steps", "at most 50"),
    ("images-absurd", b'{"prompt":"x","num_images":1000000}', JSON, 422, "num_images", None),
    ("seed-huge", b'{"prompt":"x","seed":' + b"9" * 4000 + b'}', JSON, 422, "seed", None),
    ("seed-digits-over-int-limit", b'{"prompt":"x","seed":' + b"9" * 5000 + b"}", JSON, 422, "body", "too many digits"),
    ("guidance-nan", b'{"prompt":"x","guidance":NaN}', JSON, 422, "guidance", "finite"),
    ("guidance-inf", b'{"prompt":"x","guidance":Infinity}', JSON, 422, "guidance", "finite"),
    ("guidance-neg-inf", b'{"prompt":"x","guidance":-Infinity}', JSON, 422, "guidance", None),
    ("guidance-1e999", b'{"prompt":"x","guidance":1e999}', JSON, 422, "guidance", None),
    ("gamma-nan", b'{"prompt":"x","cache":{"gamma":NaN}}', JSON, 422, "cache.gamma", "finite"),
    ("seed-inf", b'{"prompt":"x","seed":Infinity}', JSON, 422, "seed", None),
    ("prompt-nul", b'{"prompt":"a\\u0000b"}', JSON, 422, "prompt", "control characters"),
    ("prompt-escape-seq", b'{"prompt":"\\u001b[31mred"}', JSON, 422, "prompt", "control characters"),
    ("prompt-del", b'{"prompt":"a\\u007f"}', JSON, 422, "prompt", "control characters"),
    ("negative-nul", b'{"prompt":"x","negative_prompt":"\\u0000"}', JSON, 422, "negative_prompt", "control"),
    ("prompt-lone-surrogate", b'{"prompt":"a\\ud800b"}', JSON, 422, "prompt", None),
    ("prompt-too-long", json.dumps({"prompt": "\u6f22" * 501}).encode(), JSON, 422, "prompt", "limit is 500"),
    ("prompt-object", b'{"prompt":{"$gt":""}}', JSON, 422, "prompt", None),
    ("prompt-array", b'{"prompt":["a","b"]}', JSON, 422, "prompt", None),
    ("prompt-null", b'{"prompt":null}', JSON, 422, "prompt", None),
    ("invalid-utf8", b'{"prompt":"\xff\xfe\xfd"}', JSON, 422, "body", "not UTF-8"),
    ("not-json", b"{prompt: x}", JSON, 422, None, "not valid JSON"),
    ("empty-body", b"", JSON, 422, None, None),
    ("json-array", b"[1,2,3]", JSON, 422, None, None),
    ("json-string", b'"prompt"', JSON, 422, None, None),
    ("text-plain", b'{"prompt":"x"}', {"Content-Type": "text/plain"}, (415, 422), None, None),
    ("form", b"prompt=x", {"Content-Type": "application/x-www-form-urlencoded"}, (415, 422), None, None),
    ("multipart", b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--b--\r\n',
     {"Content-Type": "multipart/form-data; boundary=b"}, (415, 422), None, None),
    ("xml", b"<prompt>x</prompt>", {"Content-Type": "application/xml"}, (415, 422), None, None),
    ("deep-array", b"[" * DEEP + b"]" * DEEP, JSON, 422, "body", "nested too deeply"),
    ("deep-in-cache", b'{"prompt":"x","cache":' + b'{"a":' * 20000 + b"1" + b"}" * 20000 + b"}", JSON,
     (400, 413, 422), None, None),
    ("nested-in-cache", b'{"prompt":"x","cache":' + b'{"a":' * 200 + b"1" + b"}" * 200 + b"}", JSON,
     422, "cache.a", None),
    ("unknown-field", b'{"prompt":"x","__proto__":{"admin":true}}', JSON, 422, "__proto__", "not a known field"),
    ("duplicate-key-last-bad", b'{"prompt":"x","prompt":"\\u0000"}', JSON, 422, "prompt", None),
    ("cache-modules", b'{"prompt":"x","cache":{"modules":{"attn":["(a+)+$"]}}}', JSON, 422, "cache.modules", None),
    ("oversized", b'{"prompt":"' + b"x" * 70_000 + b'"}', JSON, 413, "body", "exceeds"),
    ("idempotency-key-too-long", b'{"prompt":"x"}', {**JSON, "Idempotency-Key": "k" * 300}, 422, None, None),
]


@pytest.mark.parametrize("raw,headers,status,param,fragment", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_body_gets_its_4xx_and_never_reaches_a_worker(hostile, raw, headers, status, param, fragment):
    r = hostile.redis_client()
    before = _queued_state(r)
    with httpx.Client(base_url=hostile.base_url, timeout=30) as c:
        for path in ("/generate", "/v1/images/generations"):
            if path != "/generate" and (param in ("width", "num_images", "__proto__") or "Idempotency-Key" in headers):
                continue  # not part of the OpenAI route (it spells sizes differently and ignores unknown fields)
            err = _err(c.post(path, content=raw, headers={**headers, "Prefer": "respond-async"}), status)
            if param and path == "/generate":
                assert err["param"] == param, err
            if fragment and path == "/generate":
                assert fragment in err["message"], err
    assert _queued_state(r) == before


def test_oversized_body_without_content_length_is_cut_off(hostile):
    """A chunked upload is counted as it arrives, whatever the client claims."""
    r = hostile.redis_client()
    before = _queued_state(r)

    def chunks():
        yield b'{"prompt":"'
        for _ in range(200):
            yield b"x" * 1024
        yield b'"}'

    with httpx.Client(base_url=hostile.base_url, timeout=30) as c:
        resp = c.post("/generate", content=chunks(), headers=JSON)
    assert "content-length" not in {k.lower() for k in resp.request.headers}
    assert _err(resp, 413)["code"] == "body_too_large"
    assert _queued_state(r) == before


def test_benign_unicode_is_served_untouched(hostile):
    """Right-to-left marks, zero-width joiners, emoji and CJK are prompts like any other."""
    r = hostile.redis_client()
    with httpx.Client(base_url=hostile.base_url, timeout=30) as c:
        for i, prompt in enumerate(["\u202eevil\u202c", "a\u200db", "\U0001f525" * 100, "\u6f22\u5b57\n\ttab",
                                    "'; DROP TABLE jobs; --", "{{7*7}} ${jndi:ldap://x}", "%s%n%x"]):
            job = submit(c, prompt=prompt, seed=i)
            wait_until(lambda: c.get(f"/jobs/{job}").json()["status"] == "succeeded", what=f"prompt {i}")
            assert ledger_problems(r, job, prompt, i) == []
            assert c.get(f"/jobs/{job}").json()["seed"] == i


MODEL_NAMES = ["../../etc/passwd", "..", ".", "/etc/passwd", "noop/../noop", "..%2f..%2fetc%2fpasswd",
               "C:\\Windows\\win.ini", "noop\x00", "~root", "$HOME", "file:///etc/passwd", "\\\\host\\share",
               "noop/", " noop", "service", "tests", "docs", "README.md", "pyproject.toml", "etc", "models.yaml",
               "noop.py", "__init__.py", "weights", "shapes"]


def test_model_names_never_reach_the_filesystem(hostile):
    """Names are looked up in the registry only: paths are refused by pattern, real files are unknown models."""
    r = hostile.redis_client()
    before = _queued_state(r)
    with httpx.Client(base_url=hostile.base_url, timeout=30) as c:
        for name in MODEL_NAMES:
            for path in ("/generate", "/v1/images/generations"):
                err = _err(c.post(path, json={"prompt": "x", "model": name}), (404, 422))
                assert err["param"] == "model", (name, err)
                assert err["code"] in ("model_not_found", "validation_error"), (name, err)
        # Route parameters are patterns too: traversal never resolves to another route or a file.
        for path in ("/jobs/../../etc/passwd", "/jobs/..%2f..%2fetc%2fpasswd", "/jobs/%2e%2e/%2e%2e/openapi.json",
                     "/jobs/" + "0" * 32 + "/images/..%2f..%2fREADME.md", "/jobs/" + "0" * 32 + "/images/-1"):
            resp = c.get(path)
            assert resp.status_code in (404, 422) and resp.json()["error"]["message"], (path, resp.text[:200])
            assert "ClusCa" not in resp.text[:2000] or resp.status_code != 200
    assert _queued_state(r) == before


def test_registry_paths_come_only_from_the_operator(hostile):
    """What clients see of a model never includes a path; request schemas have no path field."""
    with httpx.Client(base_url=hostile.base_url, timeout=30) as c:
        models = c.get("/models").json()["models"]
        spec = c.get("/openapi.json").json()
    assert models and all("path" not in m for m in models)
    text = json.dumps(models)
    assert str(hostile.models_file.parent) not in text and str(ROOT) not in text
    for name in ("GenerateRequest", "OpenAIImageRequest", "CacheSettings"):
        assert "path" not in spec["components"]["schemas"][name]["properties"]


SSRF_URLS = [
    "http://127.0.0.1/hook", "http://127.1/", "http://2130706433/", "http://0x7f000001/", "http://0177.0.0.1/",
    "http://0/", "http://0.0.0.0:8000/", "http://localhost/", "http://LOCALHOST./", "http://[::1]/",
    "http://[::]/", "http://[::ffff:127.0.0.1]/", "http://[::ffff:7f00:1]/", "http://10.0.0.1/",
    "http://172.16.5.4/", "http://192.168.1.1/", "http://169.254.169.254/latest/meta-data/",
    "http://[fd00::1]/", "http://[fe80::1]/", "http://100.64.0.1/", "http://198.18.0.1/", "http://224.0.0.1/",
    "http://255.255.255.255/", "http://example.com@127.0.0.1/", "https://127.0.0.1:443/",
    "http://user:pw@example.com/", "gopher://127.0.0.1:6379/_FLUSHALL", "file:///etc/passwd",
    "dict://127.0.0.1:6379/", "ftp://10.0.0.1/", "http:///nohost", "http://[::1", "javascript:alert(1)",
]


def test_webhook_ssrf_targets_refused(hostile):
    r = hostile.redis_client()
    before = _queued_state(r)
    with httpx.Client(base_url=hostile.base_url, timeout=30) as c:
        for url in SSRF_URLS:
            err = _err(c.post("/generate", json={"prompt": "x", "webhook_url": url}), 422)
            assert err["param"] == "webhook_url", (url, err)
    assert _queued_state(r) == before


def test_private_webhooks_allowed_only_when_configured(hostile):
    proc, url = hostile.start_api({"CLUSCA_WEBHOOK_ALLOW_PRIVATE": "1"})
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            for target in ("http://127.0.0.1:9/hook", "http://10.0.0.1/hook", "http://[::1]:9/"):
                resp = c.post("/generate", json={"prompt": "x", "webhook_url": target},
                              headers={"Prefer": "respond-async"})
                assert resp.status_code == 202, resp.text
            # Schemes and credentials stay refused even then.
            for target in ("gopher://127.0.0.1:6379/_x", "http://u:p@127.0.0.1/"):
                assert _err(c.post("/generate", json={"prompt": "x", "webhook_url": target}), 422)
    finally:
        Service.stop(proc)


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []
    redirect_to = ""

    def do_POST(self):  # noqa: N802
        type(self).hits.append(self.path)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/redirect":
            self.send_response(307)
            self.send_header("Location", type(self).redirect_to)
        else:
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhook_delivery_rechecks_dns_and_never_follows_redirects(monkeypatch):
    from service import webhooks

    srv = http.server.HTTPServer(("127.0.0.1", 0), _Recorder)
    port = srv.server_address[1]
    _Recorder.hits, _Recorder.redirect_to = [], f"http://127.0.0.1:{port}/internal"
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        # DNS rebinding: the name looked public when the request came in, points home at delivery.
        answers = iter(["93.184.216.34", "127.0.0.1"])
        real = socket.getaddrinfo

        def rebinding(host, *args, **kw):
            if host == "hook.example":
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]
            return real(host, *args, **kw)

        monkeypatch.setattr(webhooks.socket, "getaddrinfo", rebinding)
        webhooks.check_url(f"http://hook.example:{port}/x", allow_private=False)
        assert not webhooks.deliver(f"http://hook.example:{port}/x", {"id": "j"}, secret="s", allow_private=False)
        assert _Recorder.hits == []
        # Redirects are not followed, even to an allowed target.
        assert not webhooks.deliver(f"http://127.0.0.1:{port}/redirect", {"id": "j"}, secret="s",
                                    allow_private=True, attempts=1)
        assert _Recorder.hits == ["/redirect"]
    finally:
        srv.shutdown()


# ---------------------------------------------------------------------------- nothing unpickled
_UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "jsonpickle", "joblib"}
_UNSAFE_CALLS = {("torch", "load"), ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"),
                 ("numpy", "load"), ("np", "load")}


def test_no_code_path_can_unpickle():
    """Static check over the shipped code: no pickle-family import, no eval/exec, no pickle-backed loader."""
    found = []
    for path in [*(ROOT / "service").rglob("*.py"), *(ROOT / "clusca").rglob("*.py")]:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                found += [where for a in node.names if a.name.split(".")[0] in _UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _UNSAFE_MODULES:
                found.append(where)
            elif isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id in ("eval", "exec", "__import__"):
                    found.append(f"{where} {f.id}()")
                elif (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                      and (f.value.id, f.attr) in _UNSAFE_CALLS):
                    found.append(f"{where} {f.value.id}.{f.attr}()")
    assert not found, found


class _Boom:
    """Unpickling this runs a shell command that leaves a marker file."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_payload_in_the_stream_is_rejected_not_executed(hostile, tmp_path):
    r = hostile.redis_client()
    _Boom.marker = str(tmp_path / "pwned")
    payload = pickle.dumps(_Boom())
    # 1. A stream entry whose job field is a pickle, 2. a job record whose stored request is a pickle,
    # 3. job records whose request is JSON of the wrong shape.
    r.xadd(stream_key("noop"), {"job": payload})
    ids = [model_tag("noop") + c * 28 for c in "abc"]  # ids of the noop model's tag, as the API makes them
    for job_id, request in ((ids[0], payload), (ids[1], b'{"prompt": ["not", "a", "job"]}'),
                            (ids[2], b'[1, 2, 3]')):
        r.hset(job_key(job_id), mapping={"id": job_id, "model": "noop", "status": "queued",
                                                "request": request, "created": str(time.time()),
                                                "step": "0", "steps": "4", "attempts": "0"})
        r.xadd(stream_key("noop"), {"job": job_id})
        # One at a time, so each is also delivered alone (a worker takes a lone job on a shorter path).
        wait_until(lambda: r.hget(job_key(job_id), "status") != b"queued", timeout=15,
                   what=f"injected job {job_id} delivered")
    with httpx.Client(base_url=hostile.base_url, timeout=30) as c:
        # The worker is still healthy and serves the next ordinary job.
        after = submit(c, prompt="after the injection", seed=5)
        wait_until(lambda: c.get(f"/jobs/{after}").json()["status"] == "succeeded", timeout=30,
                   what="a job after the injected entries")
        for job_id in ids:
            wait_until(lambda: r.hget(job_key(job_id), "status") == b"failed", timeout=15,
                       what=f"injected job {job_id} rejected")
            assert r.hget(job_key(job_id), "error"), "a rejected job says why"
            resp = c.get(f"/jobs/{job_id}")
            assert resp.status_code < 500, resp.text[:300]
    assert ledger_problems(r, after, "after the injection", 5) == []
    assert not Path(_Boom.marker).exists(), "the pickle was executed"
    # Refused entries are let go: once idle, no worker still counts them as running.
    wait_until(lambda: all(json.loads(r.get(k) or b"{}").get("running", 0) == 0 for k in r.scan_iter("clusca:worker:*")),
               timeout=10, what="workers to report nothing running")
    assert r.xlen(stream_key("noop")) == 0 and r.xpending(stream_key("noop"), "workers")["pending"] == 0
    assert all(p.poll() is None for p in hostile.procs[:2]), "the worker or the API died"


# ---------------------------------------------------------------------------- API keys
def test_key_check_is_constant_time_and_tries_every_key(hostile, monkeypatch):
    """Every configured key is compared with hmac.compare_digest, with no early exit on a match."""
    from fastapi.testclient import TestClient

    from service.api import app as app_module
    from service.api import deps
    from service.registry import Registry
    from service.settings import Settings

    source = Path(deps.__file__).read_text()
    assert "compare_digest" in source
    tree = ast.parse(source)
    for node in ast.walk(tree):  # no ==/!=/in on anything named like a key or credential
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn))
                                                 for op in node.ops):
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | \
                    {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
            assert not names & {"key", "keys", "given", "api_keys", "credentials", "creds"}, ast.unparse(node)
    calls: list[tuple[bytes, bytes]] = []
    real = deps.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(deps.hmac, "compare_digest", spy)
    settings = Settings(redis_url=hostile.redis_url, api_keys=SECRET_KEYS, models_file=str(hostile.models_file),
                        default_model="noop")
    app = app_module.create_app(settings, Registry.load(hostile.models_file))
    with TestClient(app) as client:
        for given, status in ((SECRET_KEYS[0], 200), (SECRET_KEYS[2], 200), ("wrong", 401),
                              (SECRET_KEYS[0][:-1], 401), ("", 401)):
            calls.clear()
            headers = {"Authorization": f"Bearer {given}"} if given else {}
            assert client.get("/models", headers=headers).status_code == status
            assert len(calls) == len(SECRET_KEYS), (given, calls)
            assert sorted(b for _, b in calls) == sorted(k.encode() for k in SECRET_KEYS)


def test_api_keys_never_logged_nor_stored(hostile, caplog):
    """Keys in every kind of request (good, bad, failing, malformed) appear in no log and no Redis value."""
    from fastapi.testclient import TestClient

    from service.api import app as app_module
    from service.registry import Registry
    from service.settings import Settings

    env = {"CLUSCA_API_KEYS": ",".join(SECRET_KEYS), "CLUSCA_LOG_LEVEL": "DEBUG"}
    proc, url = hostile.start_api(env)
    worker = hostile.start_worker("noop", {"CLUSCA_LOG_LEVEL": "DEBUG", **env})
    wrong = "sk-live-4f1c0ffeX"
    requests_made = 0
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            for key in (*SECRET_KEYS, wrong):
                h = {"Authorization": f"Bearer {key}", "Idempotency-Key": "idem-1"}
                for method, path, body in (("POST", "/generate", {"prompt": "k", "seed": 1}),
                                           ("POST", "/generate", {"prompt": "k", "steps": 0}),
                                           ("POST", "/generate", {"prompt": "k", "model": "failing"}),
                                           ("POST", "/v1/images/generations", {"prompt": "k"}),
                                           ("GET", "/jobs/" + "0" * 32, None), ("GET", "/models", None),
                                           ("GET", "/jobs/bad", None)):
                    resp = c.request(method, path, json=body, headers=h)
                    requests_made += 1
                    assert key not in resp.text
                    if key == wrong:
                        assert resp.status_code == 401
            # Malformed authorisation headers.
            for h in ({"Authorization": f"Basic {SECRET_KEYS[0]}"}, {"Authorization": f"Bearer  {SECRET_KEYS[0]} x"},
                      {"Authorization": f"{SECRET_KEYS[0]}"}):
                assert c.get("/models", headers=h).status_code == 401
        # In-process too, capturing every logger at DEBUG.
        caplog.set_level(logging.DEBUG)
        settings = Settings(redis_url=hostile.redis_url, api_keys=SECRET_KEYS, models_file=str(hostile.models_file),
                            default_model="noop")
        with TestClient(create := app_module.create_app(settings, Registry.load(hostile.models_file))) as client:
            assert create is not None
            for key in (SECRET_KEYS[1], wrong):
                client.post("/generate", json={"prompt": "x", "steps": 0}, headers={"Authorization": f"Bearer {key}"})
                client.get("/models", headers={"Authorization": f"Bearer {key}"})
    finally:
        Service.stop(proc)
        Service.stop(worker)
    assert requests_made >= 28
    logs = "".join(Path(p.log_path).read_text(errors="replace") for p in (proc, worker))
    assert logs.strip(), "the processes logged nothing at DEBUG; the check would prove nothing"
    for key in (*SECRET_KEYS, wrong):
        assert key not in logs and key not in caplog.text
    r = hostile.redis_client()
    for k in r.scan_iter("*"):
        t = r.type(k)
        blob = repr(k) + repr(
            r.get(k) if t == b"string" else r.hgetall(k) if t == b"hash" else r.lrange(k, 0, -1) if t == b"list"
            else r.xrange(k) if t == b"stream" else r.zrange(k, 0, -1) if t == b"zset" else b"")
        for key in (*SECRET_KEYS, wrong):
            assert key not in blob, f"{key} stored in {k!r}"
