"""POST /generate: queue a job, then wait for it (default) or answer 202 at once."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from service.contract import FAILED, JobRecord
from service.api.deps import AuthDep, ServicesDep
from service.api.edit_inputs import keep_edit, read_edit
from service.api.errors import ApiError
from service.api.resolve import JobAsk, idempotency_scope, request_fingerprint, resolve_job
from service.api.schemas import ErrorBody, GenerateRequest, GenerateResponse, JobStatus
from service.api.submit import submit, wait_for
from service.api.views import generate_response, job_status

router = APIRouter(tags=["generate"])

ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody} for s in (400, 401, 404, 413, 422, 429, 503)}


def wants_async(prefer: str | None, flag: bool) -> bool:
    return flag or (prefer is not None and "respond-async" in prefer.lower())


@router.post("/generate", response_model=GenerateResponse, summary="Generate images or videos",
             responses={202: {"model": JobStatus, "description": "Accepted; poll or stream the job"},
                        408: {"model": ErrorBody, "description": "The job ran past its timeout_s"},
                        500: {"model": GenerateResponse, "description": "The job failed"}, **ERRORS})
async def generate(body: GenerateRequest, request: Request, services: ServicesDep, identity: AuthDep,
                   prefer: Annotated[str | None, Header(max_length=200)] = None,
                   idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> Any:
    """Queue one generation. Synchronous by default (up to ``CLUSCA_SYNC_TIMEOUT_S``, then 202);
    ``Prefer: respond-async`` or ``"async": true`` answers 202 with the job at once.
    The same ``Idempotency-Key`` with the same request returns the same job (also while it
    runs) and never runs it twice; with a different request it is a 422."""
    idem = idempotency_scope(identity, idempotency_key)
    edit = await read_edit(services.settings, body.image, body.mask)
    entry, job = await resolve_job(services.registry, services.settings, JobAsk.of(body, edit=edit),
                                   services.adapters)
    await keep_edit(services, entry.name, edit)
    fingerprint = request_fingerprint("/generate", entry.name, job, body.seed) if idem else ""
    job_id, created = await submit(services, entry.name, job, idem, fingerprint)
    if wants_async(prefer, body.async_):
        # A new job's record is known without asking Redis; a repeated key may be further along.
        record = JobRecord.queued(job_id, entry.name, job, time.time()) if created \
            else await services.queue.get(job_id)
        if record is None:
            raise ApiError(404, "job_not_found", "the job of this Idempotency-Key has expired")
        return JSONResponse(job_status(record).model_dump(mode="json"), status_code=202,
                            headers={"Location": f"/jobs/{job_id}", "Preference-Applied": "respond-async"})
    gone = request.is_disconnected if body.cancel_on_disconnect and created else None
    record, finished, images = await wait_for(services, job_id, files=body.inline, gone=gone)
    if not finished:
        return JSONResponse(job_status(record).model_dump(mode="json"), status_code=202,
                            headers={"Location": f"/jobs/{job_id}"})
    if record.deadline_exceeded:
        raise ApiError(408, "deadline_exceeded", f"{record.error}; the job: GET /jobs/{job_id}", param="timeout_s")
    if record.adapter_unavailable:
        raise ApiError(422, "adapter_unavailable", f"{record.error}; the job: GET /jobs/{job_id}", param="adapters")
    resp = generate_response(record, images, inline=body.inline)
    return JSONResponse(resp.model_dump(mode="json"), status_code=500 if record.status == FAILED else 200)
