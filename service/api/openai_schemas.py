"""OpenAI's list and model objects, as the OpenAI SDKs read them (beside schemas.py, which holds the
request and job shapes)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field

from .schemas import OpenAIVideo


class OpenAIVideoList(BaseModel):
    """A page of videos, newest first by default; the next page is ``after=<last_id>`` while ``has_more``."""

    object: Literal["list"] = "list"
    data: list[OpenAIVideo]
    first_id: Optional[str] = None
    last_id: Optional[str] = None
    has_more: bool


class OpenAIModel(BaseModel):
    """OpenAI's model object; ``output`` (image or video) is this service's."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="When this API process started serving the model (unix seconds).")
    owned_by: str = "clusca"
    # Extension.
    output: str = Field("image", description="What the model makes: image or video (`GET /models` has the rest).")


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]
