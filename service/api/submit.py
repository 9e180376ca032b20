"""Queueing a resolved job and waiting for it: what the generation endpoints share.

Routers do not import each other; what more than one of them needs lives here.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from service.contract import SUCCEEDED, JobRecord, JobRequest
from service.broker.lanes import lane_of
from service.broker.wire import IdempotencyMismatch, QueueFull
from service.outputs.store import open_output, stored_is_ref
from service.api.deps import Services
from service.api.errors import ApiError
from service.api.adapter_catalog import count_requests


async def submit(services: Services, model: str, job: JobRequest, idem: str | None,
                 fingerprint: str = "") -> tuple[str, bool]:
    """Queue ``job`` in the lane its cost picks; return ``(job_id, created)``, or raise the API error
    for a full queue or a reused key."""
    depth_limit = services.settings.max_queue
    lane = lane_of(services.registry.get(model).limits, job)
    try:
        job_id, created = await services.queue.enqueue(model, job, idem, fingerprint, lane=lane)
    except IdempotencyMismatch:
        raise ApiError(422, "idempotency_key_reused", "Idempotency-Key: this key was already used for a different "
                       "request; use a new key for a new request", param="Idempotency-Key") from None
    except QueueFull as exc:
        raise ApiError(429, "queue_full", f"the queue for model {model!r} is full ({exc.depth} jobs, "
                       f"limit {depth_limit}); retry later", headers={"Retry-After": "2"}) from None
    if created:
        count_requests(model, job.adapters)
    return job_id, created


# How often a synchronous request checks that its client is still there.
DISCONNECT_POLL_S = 0.5


async def wait_for(services: Services, job_id: str, files: bool = True,
                   gone: Callable[[], Awaitable[bool]] | None = None,
                   timeout_s: float | None = None) -> tuple[JobRecord, bool, list[bytes]]:
    """Wait up to ``timeout_s`` (default: the sync timeout); return ``(job, finished, images)``.
    Outputs kept in the video store's folder are read only when ``files`` (they are linked anyway).

    ``gone`` (the request's ``is_disconnected``): when it turns true before the job ends, the job is
    cancelled (its worker is free at once) and the answer, which nobody reads, is a 499."""
    wait_s = services.settings.sync_timeout_s if timeout_s is None else timeout_s
    waiting = asyncio.ensure_future(services.queue.wait_result(job_id, wait_s))
    while gone is not None:
        done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
        if done:
            break
        if await gone():
            waiting.cancel()
            await services.queue.cancel(job_id)
            raise ApiError(499, "client_closed_request", f"the client went away; job {job_id} was cancelled")
    finished, job, images = await waiting
    if job is None:
        raise ApiError(404, "job_not_found", "the job expired before it finished")
    if job.status != SUCCEEDED:
        return job, finished, []
    if any(stored_is_ref(v) for v in images):
        blobs = [await open_output(services.videos, v) for v in images] if files else []
        images = [await asyncio.to_thread(b.read) for b in blobs if b is not None]
    return job, finished, images
