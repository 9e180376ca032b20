"""`clusca serve --workers N`: with two or more workers, the last one keeps to the short lanes."""

from __future__ import annotations

from service.cli.serve import lane_env as _lane_env
from service.settings import Settings


def test_serve_keeps_the_last_of_several_workers_for_short_jobs():
    env = {"REDIS_URL": "redis://x"}
    assert _lane_env(env, 0, 1) == env  # a lone worker reads every lane
    lanes = [Settings.from_env(_lane_env(env, i, 3)).worker_lanes for i in range(3)]
    assert lanes == ["all", "all", "short"]
    assert "CLUSCA_WORKER_LANES" not in env  # the shared environment is left as it was
