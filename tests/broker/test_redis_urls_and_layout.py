"""REDIS_URL's forms, and the key layout's version check (real servers, no mocks)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT
from service.broker import connect as redis_conn
from service.broker.embedded import EmbeddedRedis
from service.broker.keys import LAYOUT_KEY, LayoutError, check_layout, legacy_stream_key, new_job_id, stream_key
from service.broker.consumer import WorkerQueue


@pytest.mark.parametrize("url, mode, nodes, master", [
    ("redis://127.0.0.1:6379/0", "single", (), ""),
    ("rediss://user:pw@cache.example:6380/2", "single", (), ""),
    ("redis+cluster://10.0.0.1:7000,10.0.0.2:7001", "cluster", (("10.0.0.1", 7000), ("10.0.0.2", 7001)), ""),
    ("rediss+cluster://:secret@a:7000", "cluster", (("a", 7000),), ""),
    ("redis+sentinel://s1:26379,s2:26379,s3:26379/clusca?db=1", "sentinel",
     (("s1", 26379), ("s2", 26379), ("s3", 26379)), "clusca"),
])
def test_accepted_forms(url, mode, nodes, master):
    t = redis_conn.parse(url)
    assert (t.mode, t.nodes, t.master) == (mode, nodes, master)
    if "secret" in url:
        assert t.password == "secret" and t.tls


@pytest.mark.parametrize("url, names", [
    ("http://localhost:6379", "expected redis://"),
    ("localhost:6379", "expected redis://"),
    ("redis+cluster://", "is not host:port"),
    ("redis+cluster://a:7000,b", "'b' is not host:port"),
    ("redis+cluster://a:70000", "is not host:port"),
    ("redis+cluster://a:7000/mymaster", "a cluster URL has no path"),
    ("redis+sentinel://s1:26379", "name the master"),
    ("redis+sentinel://s1:26379/m?db=x", "db must be a number"),
    ("redis+sentinel://s1:26379/m?colour=red", "unknown option"),
    ("redis+sentinel://:hunter2@s1:x/m", "is not host:port"),
])
def test_malformed_urls_are_refused_naming_the_problem(url, names):
    with pytest.raises(redis_conn.RedisUrlError) as exc:
        redis_conn.parse(url)
    assert names in str(exc.value) and "hunter2" not in str(exc.value)


@pytest.mark.parametrize("command", [["api"], ["worker", "--models", "noop"]])
def test_cli_refuses_a_malformed_url_at_start(command, service):
    env = {**service.env, "REDIS_URL": "redis+cluster://nohost"}
    res = subprocess.run([sys.executable, "-m", "service.cli", *command], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode != 0
    assert "configuration error" in res.stderr and "'nohost' is not host:port" in res.stderr, res.stderr[-800:]
    assert "Traceback" not in res.stderr


def test_a_fresh_redis_is_marked_and_a_legacy_one_refused():
    with EmbeddedRedis() as srv:
        r = redis_conn.sync_client(srv.url)
        check_layout(r, ["noop"])
        assert r.get(LAYOUT_KEY) == b"2"
        check_layout(r, ["noop"])  # idempotent
        r.set(LAYOUT_KEY, "3")
        with pytest.raises(LayoutError, match="layout '3'"):
            check_layout(r, ["noop"])
    with EmbeddedRedis() as srv:
        r = redis_conn.sync_client(srv.url)
        r.xadd(legacy_stream_key("noop"), {"job": "0" * 32})
        with pytest.raises(LayoutError, match=r"clusca:stream:noop"):
            WorkerQueue(r, worker_id="w", models=["noop", "slow"], ttl_s=60, visibility_timeout_s=30,
                        max_attempts=3).ensure_groups()
        assert not r.exists(stream_key("noop")) and r.get(LAYOUT_KEY) is None


def test_a_worker_on_a_legacy_redis_stops_with_the_reason(service):
    with EmbeddedRedis() as srv:
        redis_conn.sync_client(srv.url).xadd(legacy_stream_key("noop"), {"job": "0" * 32})
        env = {**service.env, "REDIS_URL": srv.url, "CLUSCA_WORKER_METRICS_PORT": "0"}
        res = subprocess.run([sys.executable, "-m", "service.cli", "worker", "--models", "noop"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "previous queue layout" in res.stderr and "Traceback" not in res.stderr


def test_an_entry_naming_another_models_job_is_discarded_not_run(service):
    # A job id carries its model's tag; an entry whose id belongs to another model would make the
    # start script touch keys of another slot, so it is dropped like any malformed entry.
    r = service.redis_client()
    model = "unit-foreign"
    q = WorkerQueue(r, worker_id="w", models=[model], ttl_s=60, visibility_timeout_s=30, max_attempts=3)
    q.ensure_groups()
    r.xadd(stream_key(model), {"job": new_job_id("another-model")})
    assert q.read(10, block_ms=100) == []
    assert r.xlen(stream_key(model)) == 0


def test_only_failures_from_redis_connection_code_count_as_unavailable():
    # What the asyncio cluster client lets escape when it closes a connection under a command
    # (a failover): raised from redis-py's connection module, it means "Redis unavailable".
    ns = {"__name__": "redis.asyncio.connection"}
    exec("def send(writer):\n    writer.writelines([b'x'])\n", ns)
    with pytest.raises(AttributeError) as from_redis:
        ns["send"](None)
    assert redis_conn.is_transport_failure(from_redis.value)
    with pytest.raises(AttributeError) as elsewhere:
        None.writelines([b"x"])  # type: ignore[attr-defined]
    assert not redis_conn.is_transport_failure(elsewhere.value)
