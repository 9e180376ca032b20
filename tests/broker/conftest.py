"""Fixtures of the queue tests: each runs on a single Redis server and on a Redis Cluster."""

from __future__ import annotations

import pytest

from service.broker import connect as redis_conn


class Backend:
    """A Redis to run a queue test against, by URL (a single server or a cluster)."""

    def __init__(self, url: str):
        self.redis_url = url

    def redis_client(self):
        return redis_conn.sync_client(self.redis_url)


@pytest.fixture(params=["single", "cluster"])
def backend(request, service) -> Backend:
    if request.param == "single":
        return Backend(service.redis_url)
    return Backend(request.getfixturevalue("redis_cluster").url)
