"""POST /v1/images/generations and /v1/images/edits, shaped like the OpenAI images API so its SDKs
work unchanged."""

from __future__ import annotations

import base64
import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from service.contract import SUCCEEDED, JobRequest
from service.registry import ModelEntry
from service.api.deps import AuthDep, Services, ServicesDep
from service.api.edit_inputs import EditInputs, keep_edit, read_edit_files
from service.api.errors import ApiError
from service.api.form_body import FormError, FormPart, as_object, form_parts
from service.api.schemas import (ErrorBody, OpenAIImage, OpenAIImageEditRequest, OpenAIImageRequest,
                                 OpenAIImageResponse)
from service.api.views import timings, unfinished_status
from service.api.resolve import JobAsk, check_openai_size, idempotency_scope, request_fingerprint, resolve_job
from service.api.submit import submit, wait_for

router = APIRouter(prefix="/v1", tags=["openai-compatible"])

# Seconds past a job's deadline that a synchronous OpenAI call still waits for the worker's answer.
DEADLINE_GRACE_S = 5.0


@router.post("/images/generations", response_model=OpenAIImageResponse, summary="OpenAI-compatible generation",
             responses={s: {"model": ErrorBody} for s in (400, 401, 404, 408, 409, 413, 422, 429, 500, 503)})
async def images_generations(body: OpenAIImageRequest, request: Request, services: ServicesDep,
                             identity: AuthDep,
                             idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> Any:
    """Always synchronous. ``size`` is ``WIDTHxHEIGHT`` within the model's limits (``GET /models``;
    a size outside them is a 422 listing sizes it supports) or ``auto``; extra fields ``steps``, ``seed``,
    ``guidance``, ``negative_prompt`` and ``cache`` expose this service's options."""
    idem = idempotency_scope(identity, idempotency_key)
    width, height = check_openai_size(services.registry, services.settings, body.model, body.size)
    ask = JobAsk.of(body, width=width, height=height, num_images=body.n, images_field="n", output="image")
    entry, job = await resolve_job(services.registry, services.settings, ask, services.adapters)
    return await _run(services, request, "/v1/images/generations", entry, job, body, idem)


async def _run(services: Services, request: Request, endpoint: str, entry: ModelEntry, job: JobRequest,
               body: OpenAIImageRequest, idem: str | None) -> OpenAIImageResponse:
    """Queue the job, wait for it, and answer with its images the OpenAI way."""
    fingerprint = request_fingerprint(endpoint, entry.name, job, body.seed) if idem else ""
    job_id, created = await submit(services, entry.name, job, idem, fingerprint)
    gone = request.is_disconnected if body.cancel_on_disconnect and created else None
    # The OpenAI API has no "accepted, look later": the answer waits for the job's own deadline
    # (its timeout_s, at most CLUSCA_MAX_JOB_S), which the worker enforces within a block. The grace
    # lets the worker's deadline failure arrive first; past it (no worker took the job), the job is
    # cancelled here so that it cannot run for nobody, and the answer is the same 408.
    limit_s = job.timeout_s or services.settings.max_job_s
    record, finished, images = await wait_for(services, job_id, gone=gone, timeout_s=limit_s + DEADLINE_GRACE_S)
    if not finished:
        await services.queue.cancel(job_id)
        raise ApiError(408, "deadline_exceeded", f"timeout_s: job {job_id} did not finish within its {limit_s:g} s "
                       "deadline; it was cancelled", param="timeout_s")
    if record.status != SUCCEEDED:
        code = "deadline_exceeded" if record.deadline_exceeded else \
            "adapter_unavailable" if record.adapter_unavailable else "job_" + record.status
        raise ApiError(unfinished_status(record), code, record.error or record.status,
                       param="adapters" if record.adapter_unavailable else None)
    if body.response_format == "url":
        base = str(request.base_url).rstrip("/")
        data = [OpenAIImage(url=f"{base}/jobs/{job_id}/images/{k}") for k in range(len(images))]
    else:
        data = [OpenAIImage(b64_json=base64.b64encode(b).decode()) for b in images]
    res = record.result
    return OpenAIImageResponse(created=int(record.finished or time.time()), data=data, id=job_id,
                               seed=job.seed, timings=timings(res), cache_stats=res.cache_stats if res else None)


# What the SDK's images.edit sends: these files, beside the text fields of OpenAIImageEditRequest.
_FILE_FIELDS = ("image", "image[]", "mask")
# File parts may say what they are; one that says it is something other than an image is refused.
_IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "application/octet-stream", "")
_EDIT_FORM = {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image", "prompt"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "The image to edit (PNG, JPEG or WebP); "
                  "the output has its size. The SDK names the part image[] when it sends a list; a model takes as many "
                  "images as its input_images (one for every edit pipeline here), more is a 422 naming the limit."},
        "mask": {"type": "string", "format": "binary", "description": "Where to edit: a PNG whose transparent "
                 "pixels (alpha below one half) are redrawn, the image's size (models with edits: inpaint)."},
        # The plain text fields (cache settings go as cache[knob] fields, which a form schema cannot spell).
        **{k: v for k, v in OpenAIImageEditRequest.model_json_schema()["properties"].items()
           if "$ref" not in json.dumps(v)},
        "adapters": {"type": "string", "maxLength": 2000, "description": "LoRA adapters of the model: JSON "
                     "([{\"name\": \"outline\", \"scale\": 0.8}]) or name[:scale],... (e.g. outline:0.8,pastel)"}}}}}


def _edit_form(content_type: str, raw: bytes) -> tuple[OpenAIImageEditRequest, list[FormPart], bytes | None]:
    """The form's text fields as the request model, its image parts and its mask bytes."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type", "body: /v1/images/edits takes multipart/form-data, as the "
                       f"OpenAI SDK's images.edit sends it (this request has {content_type or 'no Content-Type'})",
                       param="body", fields=[{"field": "body", "message": "must be multipart/form-data"}])
    try:
        parts = form_parts(content_type, raw)
        files: dict[str, list[FormPart]] = {}
        for part in parts:
            if part.name in _FILE_FIELDS:
                if not part.is_file:
                    raise FormError(part.name, "must be a file part (an image), not a text field")
                if part.content_type not in _IMAGE_TYPES:
                    raise FormError(part.name, f"is sent as {part.content_type}; expected image/png, image/jpeg "
                                    "or image/webp")
                files.setdefault(part.name.rstrip("[]"), []).append(part)
            elif part.is_file:
                raise FormError(part.name, "must be a text field, not a file")
        text = as_object((p.name, p.value) for p in parts if not p.is_file)
    except FormError as exc:
        raise ApiError(422, "validation_error", f"{exc.field}: {exc}", param=exc.field,
                       fields=[{"field": exc.field, "message": str(exc)}]) from None
    try:
        body = OpenAIImageEditRequest.model_validate(text)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
    images, masks = files.get("image", []), files.get("mask", [])
    if len(masks) > 1:
        raise ApiError(422, "validation_error", f"{masks[0].name}: one mask per request; this request has "
                       f"{len(masks)}", param=masks[0].name, fields=[{"field": masks[0].name, "message": "one only"}])
    if not images:
        raise ApiError(422, "validation_error", "image: is required (a file part)", param="image",
                       fields=[{"field": "image", "message": "is required"}])
    return body, images, masks[0].data if masks else None


def _check_image_count(entry: ModelEntry, images: list[FormPart]) -> None:
    """Several images (the SDK's ``image=[...]``, sent as repeated ``image[]`` parts) only where the
    model takes that many."""
    if len(images) > max(entry.input_images, 1):
        field = images[0].name
        message = (f"model {entry.name!r} takes {entry.input_images} input image per edit; this request has "
                   f"{len(images)}")
        raise ApiError(422, "validation_error", f"{field}: {message}", param=field,
                       fields=[{"field": field, "message": message}])


@router.post("/images/edits", response_model=OpenAIImageResponse, summary="OpenAI-compatible edit",
             openapi_extra={"requestBody": {"required": True, "content": _EDIT_FORM}},
             responses={s: {"model": ErrorBody} for s in (400, 401, 404, 408, 409, 413, 415, 422, 429, 500, 503)})
async def images_edits(request: Request, services: ServicesDep, identity: AuthDep,
                       idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> Any:
    """Always synchronous, multipart as the OpenAI SDK's ``images.edit`` sends it: the ``image`` file
    and optional ``mask`` file (OpenAI's convention: its transparent pixels are redrawn, the rest is
    kept exactly), ``prompt``, ``n``, ``size`` (``auto`` or the image's size), ``model`` and
    ``response_format``, plus this service's ``strength``, ``steps``, ``seed``, ``guidance``,
    ``negative_prompt`` and ``cache``."""
    idem = idempotency_scope(identity, idempotency_key)
    body, images, mask = _edit_form(request.headers.get("content-type", ""), await request.body())
    edit: EditInputs = await read_edit_files(services.settings, images[0].data, mask, images[0].name)
    width, height = check_openai_size(services.registry, services.settings, body.model, body.size)
    if width is not None and (width, height) != edit.size:
        message = f"is {body.size} but the image is {edit.size[0]}x{edit.size[1]}: an edit keeps the image's size"
        raise ApiError(422, "validation_error", f"size: {message}", param="size",
                       fields=[{"field": "size", "message": message}])
    ask = JobAsk.of(body, num_images=body.n, images_field="n", output="image", edit=edit)
    entry, job = await resolve_job(services.registry, services.settings, ask, services.adapters)
    _check_image_count(entry, images)
    await keep_edit(services, entry.name, edit)
    return await _run(services, request, "/v1/images/edits", entry, job, body, idem)
