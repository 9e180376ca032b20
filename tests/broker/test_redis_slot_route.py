"""The worker's commands go straight to the primary of their slot, and follow a slot that moved."""

from __future__ import annotations

import pytest
import redis

from service.broker import connect as redis_conn
from service.broker.embedded import EmbeddedCluster, system_redis_server
from service.broker.keys import new_job_id, stream_key
from service.contract import GROUP
from service.broker.consumer import WorkerQueue
from service.broker.slot_route import SlotRoute

pytestmark = pytest.mark.skipif(system_redis_server() is None, reason="redis-server is not installed")


@pytest.fixture(scope="module")
def cluster():
    with EmbeddedCluster(3, 0) as c:
        yield c


def _primaries(cluster: EmbeddedCluster) -> list[redis.Redis]:
    return [redis.Redis(port=n.port) for n in cluster.nodes]


def _getkeys_calls(cluster: EmbeddedCluster) -> int:
    return sum(c.info("commandstats").get("cmdstat_command|getkeys", {}).get("calls", 0) for c in _primaries(cluster))


def test_the_worker_reads_its_stream_without_asking_the_server_for_keys(cluster):
    r = redis_conn.sync_client(cluster.url)
    q = WorkerQueue(r, worker_id="w1", models=["routed"], ttl_s=60, visibility_timeout_s=30, max_attempts=3)
    q.ensure_groups()
    job_id = new_job_id("routed")
    r.xadd(stream_key("routed"), {"job": job_id})
    for c in _primaries(cluster):
        c.config_resetstat()
    got = q.read(16, block_ms=0)
    assert [d.job_id for d in got] == [job_id]
    # Through the cluster client, XREADGROUP costs COMMAND GETKEYS round trips first (two in redis-py 8).
    assert _getkeys_calls(cluster) == 0
    r.xreadgroup(GROUP, "w1", {stream_key("routed"): ">"}, count=1)
    assert _getkeys_calls(cluster) >= 1
    r.close()


def test_a_slot_that_moved_is_followed_and_then_reached_directly(cluster):
    r = redis_conn.sync_client(cluster.url)
    route = SlotRoute(r)
    key = stream_key("wanderer")
    before = route.node(key)
    route.call(key, lambda c: c.xadd(key, {"n": "1"}))
    r.delete(key)  # an empty slot can be handed to another primary by CLUSTER SETSLOT alone
    slot = r.keyslot(key)
    target = next(n for n in cluster.nodes if n.port != before.connection_pool.connection_kwargs["port"])
    with redis.Redis(port=target.port) as t:
        target_id = t.execute_command("CLUSTER MYID").decode()
        t.execute_command("CLUSTER BUMPEPOCH")
    for c in _primaries(cluster):
        c.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)

    assert route.call(key, lambda c: c.xadd(key, {"n": "2"}))  # MOVED from the old owner, sent again
    with redis.Redis(port=target.port) as t:
        assert t.xlen(key) == 1
    assert route.node(key).connection_pool.connection_kwargs["port"] == target.port
    assert route.call(key, lambda c: c.xlen(key)) == 1
    r.close()
