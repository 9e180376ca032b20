"""Queueing a resolved job and waiting for it: what the generation endpoints share.

Routers do not import each other; what more than one of them needs lives here.
"""

from __future__ import annotations

import asyncio

from service.contract import SUCCEEDED, JobRecord, JobRequest
from service.broker.lanes import lane_of
from service.broker.wire import IdempotencyMismatch, QueueFull
from service.outputs.store import open_output, stored_is_ref
from service.api.deps import Services
from service.api.errors import ApiError


async def submit(services: Services, model: str, job: JobRequest, idem: str | None,
                 fingerprint: str = "") -> tuple[str, bool]:
    """Queue ``job`` in the lane its cost picks; return ``(job_id, created)``, or raise the API error
    for a full queue or a reused key."""
    depth_limit = services.settings.max_queue
    lane = lane_of(services.registry.get(model).limits, job)
    try:
        return await services.queue.enqueue(model, job, idem, fingerprint, lane=lane)
    except IdempotencyMismatch:
        raise ApiError(422, "idempotency_key_reused", "Idempotency-Key: this key was already used for a different "
                       "request; use a new key for a new request", param="Idempotency-Key") from None
    except QueueFull as exc:
        raise ApiError(429, "queue_full", f"the queue for model {model!r} is full ({exc.depth} jobs, "
                       f"limit {depth_limit}); retry later", headers={"Retry-After": "2"}) from None


async def wait_for(services: Services, job_id: str, files: bool = True) -> tuple[JobRecord, bool, list[bytes]]:
    """Wait up to the sync timeout; return ``(job, finished, images)``. Outputs kept in the video
    store's folder are read only when ``files`` (they are linked anyway)."""
    finished, job, images = await services.queue.wait_result(job_id, services.settings.sync_timeout_s)
    if job is None:
        raise ApiError(404, "job_not_found", "the job expired before it finished")
    if job.status != SUCCEEDED:
        return job, finished, []
    if any(stored_is_ref(v) for v in images):
        blobs = [await open_output(services.videos, v) for v in images] if files else []
        images = [await asyncio.to_thread(b.read) for b in blobs if b is not None]
    return job, finished, images
