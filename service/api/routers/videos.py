"""The OpenAI-style videos API: create a job, poll it, fetch its content, cancel or delete it.

A video is a job of a video model like any other (queue, worker, progress, webhooks);
these routes only speak OpenAI's shapes: ``video_<job id>`` ids, ``seconds`` and ``size``.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Annotated, Any, Union

from fastapi import APIRouter, Header, Path, Query
from fastapi.responses import Response

from service.contract import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, TERMINAL, JobRecord
from service.outputs.store import delete_job, open_output
from service.api.content import content_response
from service.api.deps import AuthDep, ServicesDep
from service.api.errors import ApiError
from service.api.resolve import JobAsk, check_openai_size, idempotency_scope, model_entry, request_fingerprint, resolve_job
from service.api.schemas import ErrorBody, OpenAIVideo, OpenAIVideoDeleted, OpenAIVideoError, OpenAIVideoRequest
from service.api.submit import submit
from service.api.views import timings
from service.api.openai_schemas import OpenAIVideoList
from service.api.video_index import UnknownCursor

router = APIRouter(prefix="/v1/videos", tags=["openai-compatible"])

ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 401, 404, 413, 422, 429, 503)}
VideoId = Annotated[str, Path(max_length=64, description="Video id from POST /v1/videos")]
_ID = re.compile(r"^video_([0-9a-f]{32})$")
_STATUS = {QUEUED: "queued", RUNNING: "in_progress", SUCCEEDED: "completed", FAILED: "failed",
           CANCELLED: "cancelled"}


def video_object(job: JobRecord, ttl_s: int) -> OpenAIVideo:
    req, res = job.request, job.result
    if req is None or not req.is_video:
        raise ApiError(404, "video_not_found", f"no video video_{job.id}")
    fps, frames = req.fps or 1, req.num_frames or 1
    done = job.status == SUCCEEDED
    error = OpenAIVideoError(code="job_" + job.status, message=job.error or job.status) \
        if job.status in (FAILED, CANCELLED) else None
    return OpenAIVideo(
        id=f"video_{job.id}", model=job.model, status=_STATUS.get(job.status, "queued"),  # type: ignore[arg-type]
        progress=100 if done else int(100 * job.step / max(1, job.steps)),
        created_at=int(job.created or time.time()),
        completed_at=int(job.finished) if job.finished and done else None,
        expires_at=int(job.finished + ttl_s) if job.finished else None,
        seconds=f"{frames / fps:g}", size=f"{req.width}x{req.height}", error=error, num_frames=frames, fps=fps,
        seed=req.seed, output_format=req.output_format,
        content_url=f"/v1/videos/video_{job.id}/content" if done else None, cache=req.cache,
        cache_stats=res.cache_stats if res else None, timings=timings(res))


async def _video(services: Any, video_id: str) -> JobRecord:
    m = _ID.match(video_id)
    job = await services.queue.get(m.group(1)) if m else None
    if job is None or job.request is None or not job.request.is_video:
        raise ApiError(404, "video_not_found", f"no video {video_id} (unknown, or it expired after "
                       f"{services.settings.result_ttl_s} s)", param="video_id")
    return job


def frames_for(seconds: str | None, fps: int, step: int) -> int | None:
    """``seconds`` of video at ``fps`` as a frame count the model makes (1 plus a multiple of ``step``)."""
    if seconds is None:
        return None
    n = max(1, round(float(seconds) * fps))
    return 1 + max(0, round((n - 1) / step)) * step


# The same body as a form, as the OpenAI SDK's videos.create sends it (service/api/form_body.py).
_AS_FORM = {"$ref": "#/components/schemas/OpenAIVideoRequest"}


@router.post("", response_model=OpenAIVideo, summary="Create a video (OpenAI-compatible)", responses=ERRORS,
             openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": _AS_FORM},
                                                        "application/x-www-form-urlencoded": {"schema": _AS_FORM}}}})
async def create_video(body: OpenAIVideoRequest, services: ServicesDep, identity: AuthDep,
                       idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> Any:
    """Queue a video and answer at once with its ``queued`` video object; poll ``GET /v1/videos/{id}``
    (or stream ``/jobs/{job id}/events``), then fetch ``/v1/videos/{id}/content``."""
    idem = idempotency_scope(identity, idempotency_key)
    entry = model_entry(services.registry, body.model or services.settings.default_model)
    width, height = check_openai_size(services.registry, services.settings, entry.name, body.size)
    num_frames = body.num_frames
    if num_frames is None and entry.output == "video":
        num_frames = frames_for(body.seconds, body.fps or entry.defaults.fps, entry.limits.frame_step)
    ask = JobAsk.of(body, model=entry.name, width=width, height=height, num_frames=num_frames, output="video")
    entry, job = await resolve_job(services.registry, services.settings, ask, services.adapters)
    fingerprint = request_fingerprint("/v1/videos", entry.name, job, body.seed) if idem else ""
    job_id, created = await submit(services, entry.name, job, idem, fingerprint)
    record = JobRecord.queued(job_id, entry.name, job, time.time()) if created else await services.queue.get(job_id)
    if record is None:
        raise ApiError(404, "video_not_found", "the video of this Idempotency-Key has expired")
    if created:
        await services.video_index.add(identity, job_id, record.created or time.time())
    return video_object(record, services.settings.result_ttl_s)


@router.get("", response_model=OpenAIVideoList, summary="Your videos (OpenAI-compatible list)", responses=ERRORS)
async def list_videos(services: ServicesDep, identity: AuthDep,
                      after: Annotated[str | None, Query(pattern=_ID.pattern, description="The last id of the "
                                                         "previous page")] = None,
                      limit: Annotated[int, Query(ge=1, le=100)] = 20,
                      order: Annotated[str, Query(pattern="^(asc|desc)$", description="By creation time")] = "desc"
                      ) -> Any:
    """The videos made with this bearer key (all of them when the service has no keys) through
    ``POST /v1/videos`` that have not expired or been deleted, newest first unless ``order=asc``."""
    ttl = services.settings.result_ttl_s

    async def load(job_id: str) -> OpenAIVideo | None:
        job = await services.queue.get(job_id)
        return video_object(job, ttl) if job is not None and job.request is not None and job.request.is_video \
            else None

    m = _ID.match(after) if after else None
    try:
        videos, more = await services.video_index.page(
            identity, load, limit=limit, newest_first=order == "desc", after=m.group(1) if m else None)
    except UnknownCursor:
        raise ApiError(404, "video_not_found", f"after: no video {after} in this list (unknown, deleted, or "
                       "expired)", param="after") from None
    return OpenAIVideoList(data=videos, has_more=more, first_id=videos[0].id if videos else None,
                           last_id=videos[-1].id if videos else None)


@router.get("/{video_id}", response_model=OpenAIVideo, summary="A video's status", responses=ERRORS)
async def get_video(video_id: VideoId, services: ServicesDep, _: AuthDep) -> Any:
    return video_object(await _video(services, video_id), services.settings.result_ttl_s)


@router.get("/{video_id}/content", summary="A finished video's bytes (Range supported)",
            responses={200: {"content": {"video/mp4": {}, "image/webp": {}, "image/gif": {}}},
                       206: {"description": "Part of the bytes (Range)"}, 409: {"model": ErrorBody},
                       416: {"model": ErrorBody}, **ERRORS})
async def video_content(video_id: VideoId, services: ServicesDep, _: AuthDep,
                        variant: Annotated[str, Query(pattern="^video$")] = "video",
                        range: Annotated[str | None, Header(max_length=200)] = None) -> Response:
    job = await _video(services, video_id)
    if job.status != SUCCEEDED:
        raise ApiError(409, "video_not_ready", f"video {video_id} is {_STATUS.get(job.status, job.status)}; "
                       "it has no content")
    blob = await open_output(services.videos, await services.queue.image(job.id, 0))
    if blob is None:
        raise ApiError(404, "video_not_found", f"the content of video {video_id} has expired")
    media_type = job.request.content_type if job.request else "application/octet-stream"
    return await asyncio.to_thread(content_response, blob, media_type, range)


@router.delete("/{video_id}", response_model=Union[OpenAIVideoDeleted, OpenAIVideo], summary="Delete or cancel a video",
               responses=ERRORS)
async def delete_video(video_id: VideoId, services: ServicesDep, _: AuthDep) -> Any:
    """A finished video (completed, failed or cancelled) is deleted, its bytes with it, as OpenAI's
    ``videos.delete`` does: the answer is ``video.deleted`` and the id is unknown from then on. A
    video still being made is cancelled instead, a queued one at once, a running one at its next
    step: the answer is its video object, and a second DELETE once it has stopped deletes it."""
    job = await _video(services, video_id)
    if job.status not in TERMINAL:
        outcome = await services.queue.cancel(job.id)
        if outcome not in (SUCCEEDED, FAILED):  # cancelled now, or stopping at its next step
            return video_object(await _video(services, video_id), services.settings.result_ttl_s)
    await delete_job(services.queue, services.videos, job.id)
    return OpenAIVideoDeleted(id=video_id)
