"""What an operator asks of the API: jobs a failover lost, and adding or removing a model's adapters."""

from __future__ import annotations

import asyncio
import re
from typing import Annotated, Any

import anyio
from pydantic import BaseModel

from fastapi import APIRouter, Path, Request, Response

from service.adapters.store import AdapterStoreError
from service.registry import MODEL_NAME_PATTERN
from service.api.deps import AuthDep, Services, ServicesDep
from service.api.errors import ApiError
from service.api.resolve import model_entry
from service.api.schemas import AdapterInfoOut, ErrorBody
from service.api.views import adapter_out

router = APIRouter(tags=["system"])

# The upload route reads its own body (the body-size middleware passes it through): an adapter is
# larger than any request body, and it is read only once the caller's key was checked.
ADAPTER_UPLOAD = re.compile(r"^/admin/models/[^/]+/adapters/[^/]+$")


class LostJobOut(BaseModel):
    id: str
    model: str
    acknowledged_at: float


class LostJobs(BaseModel):
    lost: list[LostJobOut]
    checked: int
    pending: int


@router.get("/admin/lost-jobs", response_model=LostJobs, responses={401: {"model": ErrorBody}},
            summary="Jobs this API process confirmed that Redis no longer holds (lost in a failover)")
async def lost_jobs(services: ServicesDep, _: AuthDep) -> LostJobs:
    j = services.journal
    return LostJobs(lost=[LostJobOut(id=x.id, model=x.model, acknowledged_at=x.acknowledged_at) for x in j.lost],
                    checked=j.checked, pending=j.pending)


ModelName = Annotated[str, Path(pattern=MODEL_NAME_PATTERN, max_length=64, description="Registry name")]
AdapterName = Annotated[str, Path(pattern=MODEL_NAME_PATTERN, max_length=64, description=(
    "The adapter's name (letters, digits, '.', '_', '-'; never a path)"))]
_ADAPTER_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (401, 404, 408, 409, 413, 422)}


def _store_error(exc: AdapterStoreError) -> ApiError:
    param = "name" if exc.code == "validation_error" else "body" if exc.status in (413, 422) else None
    return ApiError(exc.status, exc.code, str(exc), param=param)


async def _receive_into(request: Request, services: Services, file: Any) -> None:
    """The request body into ``file``, at most CLUSCA_ADAPTER_MAX_BYTES, each chunk within CLUSCA_BODY_TIMEOUT_S."""
    limit = services.settings.adapter_max_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "adapter_too_large", f"body: {declared} bytes, over the limit of {limit} "
                       "(CLUSCA_ADAPTER_MAX_BYTES)", param="body")
    size = 0
    chunks = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), services.settings.body_timeout_s)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise ApiError(408, "body_timeout", "body: not received in time (CLUSCA_BODY_TIMEOUT_S per chunk)",
                           param="body") from None
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "adapter_too_large", f"body: over the limit of {limit} bytes "
                           "(CLUSCA_ADAPTER_MAX_BYTES)", param="body")
        await anyio.to_thread.run_sync(file.write, chunk)


@router.put("/admin/models/{model}/adapters/{name}", response_model=AdapterInfoOut, status_code=201,
            responses=_ADAPTER_ERRORS, summary="Add (or replace) a LoRA adapter of a model",
            openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary",
                           "description": "One LoRA .safetensors file (PEFT or diffusers key names)"}}}}})
async def put_adapter(model: ModelName, name: AdapterName, request: Request, services: ServicesDep,
                      _: AuthDep) -> Any:
    """The body is one LoRA ``.safetensors`` file; it is checked (whole, a LoRA, within
    CLUSCA_ADAPTER_MAX_BYTES) before it replaces any adapter of that name, and every worker
    uses it from its next batch on. A worker that finds it does not fit the model marks it
    unusable in ``GET /models``."""
    entry = model_entry(services.registry, model)
    store = services.adapters.store
    try:
        store.check_name(name)
        upload = store.new_upload(entry)
    except AdapterStoreError as exc:
        raise _store_error(exc) from None
    try:
        with upload.open("wb") as fh:
            await _receive_into(request, services, fh)
        stored = await anyio.to_thread.run_sync(store.commit, entry, name, upload)
    except AdapterStoreError as exc:
        raise _store_error(exc) from None
    finally:
        if upload.exists():
            upload.unlink()
    return adapter_out(stored, None)


@router.delete("/admin/models/{model}/adapters/{name}", status_code=204, responses=_ADAPTER_ERRORS,
               summary="Remove an operator's LoRA adapter of a model")
async def delete_adapter(model: ModelName, name: AdapterName, services: ServicesDep, _: AuthDep) -> Response:
    """Jobs already queued with it fail with a named error (``adapter unavailable: ...``; a
    synchronous request answers it as a 422); jobs already running finish with it. New requests
    naming it get a 422. Adapters shipped with the model cannot be removed (409)."""
    entry = model_entry(services.registry, model)
    try:
        await anyio.to_thread.run_sync(services.adapters.store.remove, entry, name)
    except AdapterStoreError as exc:
        raise _store_error(exc) from None
    return Response(status_code=204)
