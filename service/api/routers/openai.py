"""POST /v1/images/generations, shaped like the OpenAI images API so its SDKs work unchanged."""

from __future__ import annotations

import base64
import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request

from service.contract import SUCCEEDED
from service.api.deps import AuthDep, ServicesDep
from service.api.errors import ApiError
from service.api.schemas import ErrorBody, OpenAIImage, OpenAIImageRequest, OpenAIImageResponse
from service.api.views import timings, unfinished_status
from service.api.resolve import JobAsk, check_openai_size, idempotency_scope, request_fingerprint, resolve_job
from service.api.submit import submit, wait_for

router = APIRouter(prefix="/v1", tags=["openai-compatible"])


@router.post("/images/generations", response_model=OpenAIImageResponse, summary="OpenAI-compatible generation",
             responses={s: {"model": ErrorBody} for s in (400, 401, 404, 413, 422, 429, 500, 503, 504)})
async def images_generations(body: OpenAIImageRequest, request: Request, services: ServicesDep,
                             identity: AuthDep,
                             idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> Any:
    """Always synchronous. ``size`` is ``WIDTHxHEIGHT`` within the model's limits (``GET /models``;
    a size outside them is a 422 listing sizes it supports) or ``auto``; extra fields ``steps``, ``seed``,
    ``guidance``, ``negative_prompt`` and ``cache`` expose this service's options."""
    idem = idempotency_scope(identity, idempotency_key)
    width, height = check_openai_size(services.registry, services.settings, body.model, body.size)
    ask = JobAsk.of(body, width=width, height=height, num_images=body.n, images_field="n", output="image")
    entry, job = await resolve_job(services.registry, services.settings, ask)
    fingerprint = request_fingerprint("/v1/images/generations", entry.name, job, body.seed) if idem else ""
    job_id, created = await submit(services, entry.name, job, idem, fingerprint)
    gone = request.is_disconnected if body.cancel_on_disconnect and created else None
    record, finished, images = await wait_for(services, job_id, gone=gone)
    if not finished:
        raise ApiError(504, "timeout", f"job {job_id} did not finish within {services.settings.sync_timeout_s} s; "
                       f"it continues: GET /jobs/{job_id}")
    if record.status != SUCCEEDED:
        code = "deadline_exceeded" if record.deadline_exceeded else "job_" + record.status
        raise ApiError(unfinished_status(record), code, record.error or record.status)
    if body.response_format == "url":
        base = str(request.base_url).rstrip("/")
        data = [OpenAIImage(url=f"{base}/jobs/{job_id}/images/{k}") for k in range(len(images))]
    else:
        data = [OpenAIImage(b64_json=base64.b64encode(b).decode()) for b in images]
    res = record.result
    return OpenAIImageResponse(created=int(record.finished or time.time()), data=data, id=job_id,
                               seed=job.seed, timings=timings(res), cache_stats=res.cache_stats if res else None)
