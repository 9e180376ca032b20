"""What readiness reports beside ready or not: the warnings an operator should act on."""

from __future__ import annotations

from typing import Any

from service.broker.lanes import LONG


async def lane_warnings(services: Any) -> list[str]:
    """Models with a long lane whose live workers all keep to the short one: their long jobs wait
    until such a worker starts, which readiness alone would not show."""
    lanes: dict[str, set[str]] = {}
    for w in await services.queue.live_workers(services.registry.names):
        for name, where in w.models.items():
            lanes.setdefault(name, set()).update(where.get("lanes") or ())
    return [f"model {e.name!r}: no live worker reads its long lane (every one has CLUSCA_WORKER_LANES=short), "
            f"so jobs costing more than its long_cost ({e.limits.long_cost}) wait until one does"
            for e in services.registry.entries()
            if e.limits.long_cost is not None and e.name in lanes and LONG not in lanes[e.name]]

