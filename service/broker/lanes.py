"""Cost lanes: which of a model's two streams a job waits in, and which a worker reads.

A model whose limits set ``long_cost`` has two streams: jobs costing more than that
(:attr:`~service.contract.JobRequest.cost`, pixel-steps) wait in its *long* lane, all
others in its *short* lane. A worker reads the short lane first and takes a long job
only when no short one waits; a worker started with ``CLUSCA_WORKER_LANES=short`` never
takes a long job at all. So however many long jobs are queued, they cannot occupy the
workers kept for short ones, and a short job never waits behind a long one in a stream.
A model without ``long_cost`` has one lane, the short one, as before lanes existed.
"""

from __future__ import annotations

from typing import Any

SHORT = "short"
LONG = "long"
# In the order a worker reads them.
LANES: tuple[str, ...] = (SHORT, LONG)
# CLUSCA_WORKER_LANES -> the lanes such a worker reads.
WORKER_LANES: dict[str, tuple[str, ...]] = {"all": LANES, "short": (SHORT,)}


def lane_of(limits: Any, request: Any) -> str:
    """The lane ``request`` waits in, given its model's ``limits`` (anything with ``long_cost``)."""
    long_cost = getattr(limits, "long_cost", None)
    return LONG if long_cost is not None and request.cost > long_cost else SHORT
