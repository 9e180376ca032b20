"""The API's edge against clients that hold connections: a body that never arrives in full is
answered 408 within CLUSCA_BODY_TIMEOUT_S, and one API process holds at most
CLUSCA_MAX_CONNECTIONS connections. Raw sockets against a real API process."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from service.cli.main import connection_limits
from service.settings import Settings

BODY_TIMEOUT_S = 1.0
HEAD = (b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n")
PART = b'{"prompt": "a'  # 14 of the 100 bytes announced


@pytest.fixture(scope="module")
def slow_api(service):
    proc, url = service.start_api({"CLUSCA_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S), "CLUSCA_MAX_CONNECTIONS": "3"})
    yield url
    service.stop(proc)


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    return sock


def _read_answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _status_and_body(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def test_a_body_shorter_than_its_content_length_is_answered_408_within_the_timeout(slow_api):
    with _connect(slow_api) as sock:
        sock.sendall(HEAD + PART)
        sent = time.monotonic()
        raw = _read_answer(sock)  # the server closes the connection after answering
        waited = time.monotonic() - sent
    status, body = _status_and_body(raw)
    assert status == 408, raw
    assert BODY_TIMEOUT_S * 0.9 <= waited < BODY_TIMEOUT_S + 3, waited
    err = body["error"]
    assert err["code"] == "body_timeout" and err["param"] == "body", body
    assert "CLUSCA_BODY_TIMEOUT_S" in err["message"] and "1 s" in err["message"], err
    assert b"connection: close" in raw.lower()


def test_a_body_sent_a_byte_at_a_time_is_cut_off_at_the_timeout(slow_api):
    with _connect(slow_api) as sock:
        sock.sendall(HEAD)
        start = time.monotonic()
        sock.settimeout(0.2)
        raw = b""
        # Each byte arrives well within the timeout; only the whole body is late.
        for byte in PART + b"x" * 80:
            try:
                sock.sendall(bytes([byte]))
                raw += sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if raw:
                break
        sock.settimeout(10)
        try:
            raw += _read_answer(sock)
        except OSError:
            pass
        waited = time.monotonic() - start
    assert _status_and_body(raw)[0] == 408, raw
    assert waited < BODY_TIMEOUT_S + 3, waited


def test_a_whole_body_sent_in_time_is_served_and_the_timeout_is_counted_under_its_endpoint(slow_api):
    with _connect(slow_api) as sock:
        sock.sendall(HEAD + PART)
        assert _status_and_body(_read_answer(sock))[0] == 408
    with httpx.Client(base_url=slow_api, timeout=30) as c:
        assert c.post("/generate", json={"prompt": "in time"}).status_code == 200
        text = c.get("/metrics").text
    assert 'clusca_requests_total{endpoint="/generate",status="408"}' in text
    assert 'clusca_errors_total{kind="body_timeout"}' in text


def test_connections_beyond_the_cap_are_refused_until_the_slow_ones_are_cut_off(slow_api):
    # uvicorn counts the connection of the request it admits too: a cap of 3 admits 2 held and refuses a third.
    held = [_connect(slow_api) for _ in range(2)]
    try:
        for sock in held:
            sock.sendall(HEAD + PART)
        time.sleep(0.2)
        with httpx.Client(base_url=slow_api, timeout=10) as c:
            refused = c.get("/healthz")
            # The service's error shape, not uvicorn's plain text.
            assert refused.status_code == 503, refused.text
            assert refused.headers["content-type"] == "application/json", refused.headers
            assert refused.json()["error"]["code"] == "over_capacity", refused.text
            assert "CLUSCA_MAX_CONNECTIONS" in refused.json()["error"]["message"]
            assert int(refused.headers["retry-after"]) > 0 and refused.headers["connection"] == "close"
        statuses = [_status_and_body(_read_answer(sock))[0] for sock in held]
        assert statuses == [408, 408]
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    with httpx.Client(base_url=slow_api, timeout=10) as c:
        assert c.get("/healthz").status_code == 200


def test_uvicorn_is_given_the_configured_cap():
    limits = connection_limits(Settings(max_connections=7))
    assert limits["limit_concurrency"] == 7 and limits["timeout_keep_alive"] > 0
    assert Settings().body_timeout_s == 30
