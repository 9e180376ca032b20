"""Job status, images, cancellation and the progress stream."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated, Any, AsyncIterator

from fastapi import APIRouter, Header, Path
from fastapi.responses import JSONResponse, Response, StreamingResponse

from service.contract import FAILED, SUCCEEDED, JobRecord
from service.outputs.store import open_output
from service.api.deps import AuthDep, ServicesDep
from service.api.errors import ApiError
from service.api.content import content_response
from service.api.schemas import CancelResponse, ErrorBody, JobStatus
from service.api.views import job_status

router = APIRouter(prefix="/jobs", tags=["jobs"])
log = logging.getLogger("clusca.api")

JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="Job id from /generate")]
ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (401, 404, 422, 503)}


async def _job(services: Any, job_id: str) -> JobRecord:
    job = await services.queue.get(job_id)
    if job is None:
        raise ApiError(404, "job_not_found",
                       f"no job {job_id} (unknown, or its result expired after {services.settings.result_ttl_s} s)")
    return job


@router.get("/{job_id}", response_model=JobStatus, responses=ERRORS, summary="Job status")
async def get_job(job_id: JobId, services: ServicesDep, _: AuthDep) -> Any:
    return job_status(await _job(services, job_id))


@router.get("/{job_id}/images/{index}", summary="One image of a finished job (raw bytes)",
            responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}, "video/mp4": {},
                                         "image/gif": {}}}, 206: {"description": "Part of the bytes (Range)"},
                       416: {"model": ErrorBody}, **ERRORS,
                       409: {"model": ErrorBody}})
async def get_image(job_id: JobId, index: Annotated[int, Path(ge=0, le=10_000)], services: ServicesDep,
                    _: AuthDep, range: Annotated[str | None, Header(max_length=200)] = None) -> Response:
    """The bytes of output ``index`` (an image, or a video of a video model); ``Range`` asks for part of them."""
    job = await _job(services, job_id)
    if job.status != SUCCEEDED:
        raise ApiError(409, "job_not_succeeded", f"job {job_id} is {job.status}; it has no images")
    data = await services.queue.image(job_id, index)
    if data is None:
        n = job.request.num_images if job.request else 1
        raise ApiError(404, "image_not_found", f"job {job_id} has {n} image(s); index {index} does not exist",
                       param="index")
    blob = await open_output(services.videos, data)
    if blob is None:
        raise ApiError(404, "image_not_found", f"the stored output {index} of job {job_id} has expired")
    content_type = (job.result.content_type if job.result else None) or "application/octet-stream"
    return await asyncio.to_thread(content_response, blob, content_type, range)


@router.post("/{job_id}/cancel", response_model=CancelResponse, summary="Cancel a job",
             responses={**ERRORS, 409: {"model": ErrorBody},
                        202: {"model": CancelResponse, "description": "Running: it stops at its next step"}})
async def cancel_job(job_id: JobId, services: ServicesDep, _: AuthDep) -> Any:
    """A queued job is cancelled at once; a running one stops at its next denoising step (202)."""
    outcome = await services.queue.cancel(job_id)
    if outcome == "missing":
        await _job(services, job_id)
    job = await _job(services, job_id)
    if outcome in (SUCCEEDED, FAILED):
        raise ApiError(409, "job_finished", f"job {job_id} already {outcome}")
    body = job_status(job, CancelResponse).model_dump(mode="json")
    return JSONResponse(body, status_code=202 if outcome == "cancelling" else 200)


@router.get("/{job_id}/events", summary="Progress as Server-Sent Events",
            responses={200: {"content": {"text/event-stream": {}}}, **ERRORS})
async def job_events(job_id: JobId, services: ServicesDep, _: AuthDep,
                     last_event_id: Annotated[str | None, Header(pattern=r"^\d{1,19}-\d{1,19}$")] = None,
                     ) -> StreamingResponse:
    """Events ``queued``, ``started``, ``progress`` (one per step), then ``finished``, ``failed`` or
    ``cancelled``; the stream ends after the last one. ``Last-Event-ID`` resumes."""
    await _job(services, job_id)

    async def stream() -> AsyncIterator[bytes]:
        try:
            async for item in services.queue.events(job_id, last_event_id or "0", idle_s=2.0):
                if item is None:
                    yield b": keep-alive\n\n"
                    continue
                event_id, event = item
                yield f"id: {event_id}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
        except Exception as exc:  # noqa: BLE001 - headers are sent: end the stream with an error event
            log.warning("event stream of job %s ended early: %s", job_id, exc)
            yield f"event: error\ndata: {json.dumps({'type': 'error', 'message': 'event stream interrupted'})}\n\n".encode()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
