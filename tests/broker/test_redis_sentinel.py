"""The service behind Sentinel (a primary, a replica, three Sentinels): the API tests, unchanged.

``REDIS_URL=redis+sentinel://...`` names the sentinels and the master; the API and the
worker ask the sentinels for the primary. The failover itself is the slow suite's
(tests/broker/test_redis_failover.py).
"""

from __future__ import annotations

import pytest

from tests.support import wait_until
from tests.broker.redis_topologies import service_on
from service.broker import connect as redis_conn
from service.broker.embedded import EmbeddedSentinel

from tests.api.test_service_api import *  # noqa: F401,F403 - collected again, behind Sentinel


@pytest.fixture(scope="module")
def sentinel(redis_sentinel):
    return redis_sentinel


@pytest.fixture(scope="module")
def service(sentinel, tmp_path_factory):
    with service_on(sentinel, tmp_path_factory.mktemp("sentinel-service")) as svc:
        yield svc


def test_jobs_are_written_to_the_primary_and_replicated(service, sentinel):
    import redis

    from service.broker.keys import job_key

    with service.client() as c:
        job_id = c.post("/generate", json={"prompt": "replicated", "seed": 3}).json()["id"]
    primary = sentinel.current_primary()
    assert primary is sentinel.primary
    with redis.Redis(port=sentinel.replicas[0].port) as replica:
        wait_until(lambda: replica.hget(job_key(job_id), "status") == b"succeeded", timeout=10,
                   what="the job on the replica")
    assert redis_conn.parse(sentinel.url).master == EmbeddedSentinel.MASTER
