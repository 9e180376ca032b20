"""GET /v1/models and /v1/models/{model}: the registry as OpenAI model objects, for the SDKs'
``models.list()`` and ``models.retrieve()`` (``GET /models`` has the limits, defaults and workers)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Path

from ...registry import ModelEntry
from ..deps import AuthDep, ServicesDep
from ..openai_schemas import OpenAIModel, OpenAIModelList
from ..resolve import model_entry
from ..schemas import ErrorBody

router = APIRouter(prefix="/v1/models", tags=["openai-compatible"])

# The registry is read once at start-up; OpenAI's `created` has no better meaning here.
SERVING_SINCE = int(time.time())


def model_object(entry: ModelEntry) -> OpenAIModel:
    return OpenAIModel(id=entry.name, created=SERVING_SINCE, output=entry.output)


@router.get("", response_model=OpenAIModelList, summary="Models (OpenAI-compatible)",
            responses={401: {"model": ErrorBody}})
async def list_models(services: ServicesDep, _: AuthDep) -> Any:
    return OpenAIModelList(data=[model_object(e) for e in services.registry.entries()])


@router.get("/{model}", response_model=OpenAIModel, summary="One model (OpenAI-compatible)",
            responses={s: {"model": ErrorBody} for s in (401, 404, 422)})
async def retrieve_model(model: Annotated[str, Path(max_length=64, description="Registry name")],
                         services: ServicesDep, _: AuthDep) -> Any:
    return model_object(model_entry(services.registry, model))
