"""The service's processes over a Redis Cluster or Sentinel topology (for tests/test_redis_*.py).

A :class:`TopologyService` is the conftest ``Service`` (same registry, same environment,
same helpers) whose Redis is a topology: the service tests can run against it unchanged.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from conftest import BASE_ENV, MAIN_WORKER_MODELS, ROOT, TEST_MODELS, Service

from service import redis_conn


class TopologyService(Service):
    def redis_client(self):
        return redis_conn.sync_client(self.redis.url)


@contextlib.contextmanager
def service_on(topology, tmp: Path, extra_env: dict[str, str] | None = None, workers: str = MAIN_WORKER_MODELS):
    """The service (one worker serving ``workers``, one API) on ``topology``'s Redis."""
    from service.embedded_redis import free_port

    models = tmp / "models.yaml"
    models.write_text(TEST_MODELS)
    env = {**os.environ, **BASE_ENV, "REDIS_URL": topology.url, "CLUSCA_MODELS": str(models),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra_env or {})}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    svc = TopologyService(topology, models, tmp, env)
    try:
        metrics_port = free_port()
        svc.start_worker(workers, metrics_port=metrics_port)
        svc.worker_metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        _, svc.base_url = svc.start_api()
        yield svc
    finally:
        for p in reversed(svc.procs):
            Service.stop(p, timeout=10)
