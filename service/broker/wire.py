"""What both sides of the queue agree on: stream entries, event JSON, liveness, errors.

The producer (:mod:`service.broker.producer`, the API) and the consumer
(:mod:`service.broker.consumer`, a worker) read and write the same Redis keys
(:mod:`service.broker.keys`) with the same scripts (:mod:`service.broker.lua`); this module
holds the few shapes and rules that both of them need, so that neither imports the other.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from service.broker.keys import JOB_ID, job_belongs_to
from service.contract import as_text

HEARTBEAT_S = 1.0
# A worker counts as alive while its last heartbeat is younger than this.
ALIVE_WINDOW_S = 5.0


def entry_job_id(fields: dict, model: str) -> str | None:
    raw = fields.get(b"job", fields.get("job"))
    job_id = as_text(raw) if raw is not None else None
    # An id of another model's tag would name keys in another slot: never the API's doing.
    ok = isinstance(job_id, str) and JOB_ID.match(job_id) and job_belongs_to(job_id, model)
    return job_id if ok else None


class QueueFull(Exception):
    def __init__(self, depth: int):
        super().__init__(f"queue full ({depth} jobs waiting)")
        self.depth = depth


class NotReplicated(Exception):
    """The job is queued on the primary, but no replica confirmed it in time (``wait_replicas``)."""

    def __init__(self, job_id: str, acked: int, wanted: int):
        super().__init__(f"job {job_id}: {acked} of {wanted} replica(s) confirmed it")
        self.job_id = job_id


class IdempotencyMismatch(Exception):
    """The idempotency key was already used for a different request."""

    def __init__(self, job_id: str):
        super().__init__(f"the idempotency key belongs to job {job_id}, made from another request")
        self.job_id = job_id


def ordered_images(raw: dict) -> list[bytes]:
    """Image bytes by index; fields that are not indexes were not written here and are ignored."""
    indexed = {int(as_text(k)): v for k, v in raw.items() if as_text(k).isdigit()}
    return [indexed[i] for i in sorted(indexed)]


def event_json(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, "t": time.time(), **fields}, separators=(",", ":"))


@dataclass(frozen=True)
class LiveWorker:
    """A worker whose heartbeat is recent, as it describes itself."""

    id: str | None
    host: str | None
    running: int | None
    models: dict[str, dict[str, Any]]
