"""A run's divergence-guard trips (ClusCa ``cache_stats.guard_trips``) reach the worker's metrics."""

from __future__ import annotations

import dataclasses

from prometheus_client import REGISTRY

from clusca.stats import RunStats
from service.worker.execution import observe_run


def _trips(model: str, mode: str) -> float:
    return REGISTRY.get_sample_value("clusca_cache_guard_trips_total", {"model": model, "cache_mode": mode}) or 0.0


def test_guard_trips_are_counted_per_model_and_mode():
    before = _trips("guard-test", "clusca")
    tripped = dataclasses.replace(RunStats.uncached("clusca", 40), guard_trips=3, token_fraction=0.4)
    observe_run("guard-test", "clusca", 0.5, [0.1, 0.2], tripped)
    observe_run("guard-test", "clusca", 0.5, [], RunStats.uncached("clusca", 40))
    # A stopped call has no statistics, and counts nothing.
    observe_run("guard-test", "clusca", 0.5, [], None)
    assert _trips("guard-test", "clusca") == before + 3
    assert _trips("guard-test", "off") == 0.0
