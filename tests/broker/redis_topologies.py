"""The service's processes over a Redis Cluster or Sentinel topology (for tests/broker/test_redis_*.py).

A :class:`TopologyService` is the conftest ``Service`` (same registry, same environment,
same helpers) whose Redis is a topology: the service tests can run against it unchanged.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from tests.support import MAIN_WORKER_MODELS, Service, running_service

from service.broker import connect as redis_conn


class TopologyService(Service):
    def redis_client(self):
        return redis_conn.sync_client(self.redis.url)


@contextlib.contextmanager
def service_on(topology, tmp: Path, extra_env: dict[str, str] | None = None, workers: str = MAIN_WORKER_MODELS):
    """The service (one worker serving ``workers``, one API) on ``topology``'s Redis."""
    with running_service(TopologyService, topology, tmp, workers, extra_env) as svc:
        yield svc

