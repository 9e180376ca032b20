"""Confirming a job only once a replica holds it (WAIT), and finding jobs that were lost anyway."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.support import enqueue, wait_until
from service.broker import connect as redis_conn
from service.contract import JobRequest
from service.broker.embedded import EmbeddedCluster, system_redis_server
from service.broker.keys import job_key
from service.broker.producer import JobQueue
from service.broker.wire import NotReplicated
from service.broker.reconcile import AckJournal

REQ = JobRequest(prompt="p", width=16, height=16, steps=2, guidance=0.0, seed=1, cache={"mode": "off"})
needs_redis7 = pytest.mark.skipif(system_redis_server() is None, reason="redis-server is not installed")


def _enqueue(url: str, model: str, **kw):
    return enqueue(url, model, REQ, **kw)[0]


@pytest.fixture
def sentinel(redis_sentinel):
    return redis_sentinel


@needs_redis7
def test_wait_confirms_once_the_replica_has_the_job(sentinel, redis_cluster):
    import redis

    for url, replica_of in ((sentinel.url, lambda _: sentinel.replicas[0]),
                            (redis_cluster.url, lambda key: _replica_of(redis_cluster, key))):
        job_id, created = _enqueue(url, "durable", wait_replicas=1, wait_timeout_ms=2000)
        assert created
        # Confirmed means on the replica already: read it there at once, no polling.
        with redis.Redis(port=replica_of(job_key(job_id)).port) as replica:
            if "cluster" in url:
                replica.execute_command("READONLY")  # a cluster replica serves reads only when asked to
            assert replica.hget(job_key(job_id), "status") == b"queued", url


def _replica_of(cluster: EmbeddedCluster, key: str):
    import redis

    primary = cluster.primary_of(key)
    with redis.Redis(port=primary.port) as c:
        port = c.info("replication")["slave0"]["port"]
    return next(n for n in cluster.nodes if n.port == int(port))


def test_without_a_replica_the_job_is_not_confirmed(service):
    with pytest.raises(NotReplicated):
        _enqueue(service.redis_url, "durable", wait_replicas=1, wait_timeout_ms=50)


def test_the_api_answers_503_when_no_replica_confirms(service):
    proc, url = service.start_api({"CLUSCA_REDIS_WAIT_REPLICAS": "1", "CLUSCA_REDIS_WAIT_TIMEOUT_MS": "50"})
    try:
        r = httpx.post(url + "/generate", json={"prompt": "x"}, headers={"Prefer": "respond-async"}, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        assert r.json()["error"]["code"] == "not_replicated" and "Idempotency-Key" in r.json()["error"]["message"]
    finally:
        service.stop(proc)


def test_the_journal_reports_a_confirmed_job_that_redis_lacks(service):
    async def go():
        r = redis_conn.async_client(service.redis_url)
        journal = AckJournal(settle_s=0.05)
        q = JobQueue(r, max_queue=100, ttl_s=60, journal=journal)
        kept, _ = await q.enqueue("durable", REQ)
        lost, _ = await q.enqueue("durable", REQ)
        await r.delete(job_key(lost))  # what a failover to a replica that never saw it leaves behind
        await asyncio.sleep(0.1)
        found = await journal.check(r)
        await r.aclose()
        return kept, lost, found, journal

    kept, lost, found, journal = asyncio.run(go())
    assert [j.id for j in found] == [lost] and found[0].model == "durable"
    assert journal.checked == 2 and journal.pending == 0 and list(journal.lost) == found


def test_the_api_lists_lost_jobs_and_counts_them(service):
    proc, url = service.start_api({"CLUSCA_RECONCILE_SETTLE_S": "0.2"})
    r = service.redis_client()
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            ids = [c.post("/generate", json={"prompt": f"j{i}", "model": "orphan"},
                          headers={"Prefer": "respond-async"}).json()["id"] for i in range(3)]
            r.delete(job_key(ids[1]))
            body = wait_until(lambda: (lambda b: b if b["lost"] else None)(c.get("/admin/lost-jobs").json()),
                              timeout=10, what="the lost job reported")
            assert [x["id"] for x in body["lost"]] == [ids[1]] and body["lost"][0]["model"] == "orphan"
            assert 'clusca_jobs_lost_total{model="orphan"} 1.0' in c.get("/metrics").text
            time.sleep(0.5)
            assert [x["id"] for x in c.get("/admin/lost-jobs").json()["lost"]] == [ids[1]]
    finally:
        service.stop(proc)
        for j in ids:
            r.delete(job_key(j))
