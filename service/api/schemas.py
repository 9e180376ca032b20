"""Request and response models of the HTTP API (they are also the OpenAPI schema)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, field_validator

from clusca.config import KNOBS, MAX_SEED, PRESETS, ClusCaConfig, Knob
from clusca.stats import RunStats

from service.contract import ADAPTER_SCALE_RANGE, MAX_ADAPTERS, JobState, OutputFormat, Timings
from service.registry import MODEL_NAME_PATTERN, ModelLimits

def _whole_number(v: Any) -> Any:
    # 1e30 is a whole number too: read it as one, so that the model's limit refuses it by name.
    return int(v) if isinstance(v, float) and math.isfinite(v) and v.is_integer() else v


# A count whose upper bound is the model's (GET /models; the API checks it and names that limit).
Count = Annotated[int, BeforeValidator(_whole_number)]


def _knob_field(knob: Knob) -> tuple[Any, Any]:
    """The request field of one ClusCa knob: its type, range, choices and doc from the knob table."""
    typ: Any = Literal[knob.choices] if knob.choices is not None else knob.type  # type: ignore[valid-type]
    limits: dict[str, Any] = {}
    if knob.lo is not None:
        limits["gt" if knob.lo_open else "ge"] = knob.lo
    if knob.hi is not None:
        limits["le"] = knob.hi
    if knob.type is float:
        limits["allow_inf_nan"] = False
    return Optional[typ], Field(None, description=knob.doc, **limits)


# Generated from the knob table (clusca.config.KNOBS), so the schema, its OpenAPI document and the
# library can never disagree about a name, a range or a choice.
CacheSettings = create_model(
    "CacheSettings",
    __doc__="ClusCa settings of one request: a preset, and any knob of the ClusCa config.\n\n"
            "Unset fields come from the preset (default: the model's default preset, as the model tunes it).",
    __config__=ConfigDict(extra="forbid", json_schema_extra={"examples": [{"preset": "balanced"},
                                                                        {"mode": "taylorseer", "interval": 4}]}),
    preset=(Optional[Literal[tuple(PRESETS)]],  # type: ignore[valid-type]
            Field(None, description="Base settings; the model's default preset when absent.")),
    **{knob.name: _knob_field(knob) for knob in KNOBS},
)
# What a request's ``cache`` may set: ``preset`` and every knob; ``modules`` is the operator's.
CACHE_FIELDS: list[str] = sorted(CacheSettings.model_fields)


TIMEOUT_FIELD: Any = Field(None, gt=0, allow_inf_nan=False, description=(
    "Seconds from submission after which the job fails (error 'deadline exceeded') and its worker is "
    "free again; default and maximum CLUSCA_MAX_JOB_S."))
CANCEL_ON_DISCONNECT_FIELD: Any = Field(True, description=(
    "A synchronous request whose client disconnects before the answer is cancelled."))
STRENGTH_FIELD: Any = Field(None, gt=0, le=1, allow_inf_nan=False, description=(
    "Edits: how much of the image is redrawn, the share of the steps denoised from the image noised "
    "to that level (1: from pure noise). Default 0.8, or 1 with a mask; only with an image."))


class AdapterChoice(BaseModel):
    """One LoRA adapter of the model (``GET /models`` lists them) and how strongly it applies."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "outline", "scale": 0.8}]})

    name: str = Field(pattern=MODEL_NAME_PATTERN, max_length=64, description="An adapter of the model, by name.")
    scale: float = Field(1.0, ge=ADAPTER_SCALE_RANGE[0], le=ADAPTER_SCALE_RANGE[1], allow_inf_nan=False,
                         description="How strongly it applies (1: as trained; 0: not at all; negative: against it).")


ADAPTERS_FIELD: Any = Field(None, max_length=MAX_ADAPTERS, description=(
    "LoRA adapters to run with, each once, up to the model's adapters.max_per_request (GET /models lists "
    "the model's adapters and its limit); none: the base model."))


def _adapters_text(v: Any) -> Any:
    """A form's ``adapters`` field: JSON (``[{"name": "outline", "scale": 0.8}]``) or ``name[:scale],...``."""
    if not isinstance(v, str):
        return v
    text = v.strip()
    if text.startswith("["):
        import json

        try:
            return json.loads(text)
        except ValueError:
            raise ValueError("is not a JSON list of {name, scale} objects") from None
    out: list[Any] = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, scale = item.partition(":")
        out.append({"name": name, **({"scale": scale} if scale else {})})
    return out


class GenerateRequest(BaseModel):
    """One text-to-image request, or an edit of an image (``image``, ``strength``, ``mask``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, json_schema_extra={
        "examples": [{"prompt": "a red circle on the left", "seed": 7, "cache": {"preset": "balanced"}}]})

    prompt: str = Field(max_length=100_000, description="What to draw.")
    negative_prompt: Optional[str] = Field(None, max_length=100_000)
    model: Optional[str] = Field(None, pattern=MODEL_NAME_PATTERN, description="Registry name; default CLUSCA_DEFAULT_MODEL.")
    width: Optional[Count] = Field(None, ge=8)
    height: Optional[Count] = Field(None, ge=8)
    steps: Optional[Count] = Field(None, ge=1)
    guidance: Optional[float] = Field(None, ge=0, le=100, allow_inf_nan=False)
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="Random when absent; the answer says which.")
    num_images: Count = Field(1, ge=1)
    output_format: Optional[OutputFormat] = Field(None, description="Images: png (default), jpeg, webp. "
                                                  "Videos: mp4 (default, H.264), webp or gif (animated).")
    num_frames: Optional[Count] = Field(None, ge=1, description="Video models: frames per video.")
    fps: Optional[int] = Field(None, ge=1, le=240, description="Video models: frame rate of the encoded video.")
    inline: bool = Field(False, description="Video models: also return the videos base64-encoded in `images` "
                                            "(by default the answer links to them).")
    cache: Optional[CacheSettings] = None
    image: Optional[str] = Field(None, description=(
        "Edits: the image to start from, a base64 PNG, JPEG or WebP (or a data: URL). The output has "
        "its size, which must be one the model takes; models with `edits` in GET /models."))
    strength: Optional[float] = STRENGTH_FIELD
    mask: Optional[str] = Field(None, description=(
        "Inpainting: what to repaint, white (repaint) and black (keep), the image's size, encoded as "
        "`image`; the pixels outside it are kept exactly. Models with `edits: inpaint`."))
    webhook_url: Optional[str] = Field(None, max_length=2048)
    timeout_s: Optional[float] = TIMEOUT_FIELD
    adapters: Optional[list[AdapterChoice]] = ADAPTERS_FIELD
    async_: bool = Field(False, alias="async", description="Answer 202 with a job id instead of waiting.")
    cancel_on_disconnect: bool = CANCEL_ON_DISCONNECT_FIELD


class JobLinks(BaseModel):
    self: str
    events: str
    cancel: str
    images: list[str] = []


class JobStatus(BaseModel):
    """Where a job stands (also the 202 answer of an asynchronous request)."""

    id: str
    model: str
    status: JobState
    step: int = Field(description="Denoising steps done so far.")
    steps: int
    seed: Optional[int] = None
    seeds: list[int] = []
    num_images: int = 1
    output_format: OutputFormat = "png"
    num_frames: Optional[int] = Field(None, description="Frames per video (video models).")
    fps: Optional[int] = None
    width: Optional[int] = None
    height: Optional[int] = None
    guidance: Optional[float] = None
    strength: Optional[float] = Field(None, description="Edits: the strength they ran with.")
    masked: bool = Field(False, description="Edits: whether a mask said what to repaint.")
    cache: Optional[ClusCaConfig] = Field(None, description="The resolved ClusCa settings of the run.")
    adapters: list[AdapterChoice] = Field(default_factory=list, description="The LoRA adapters it runs with.")
    adapter_load_s: Optional[float] = Field(None, description="Seconds its call spent loading adapters into "
                                                              "the worker's slots (0: all were loaded).")
    cache_stats: Optional[RunStats] = Field(None, description="Statistics of the ClusCa run.")
    timeout_s: Optional[float] = Field(None, description="Seconds from creation after which the job fails.")
    timings: Timings = Field(default_factory=Timings)
    attempts: int = 0
    batch_images: Optional[int] = Field(None, description="Images computed in the same pipeline call.")
    error: Optional[str] = None
    created_at: Optional[float] = None
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    links: JobLinks


class GenerateResponse(JobStatus):
    """A finished synchronous request: the job plus its images, base64-encoded (videos: only when
    ``inline`` was asked; ``links.images`` names them either way)."""

    images: list[str] = Field(default_factory=list, description="Base64 images (or videos) in output_format.")


class CancelResponse(JobStatus):
    pass


class FieldError(BaseModel):
    field: str
    message: str


class ErrorDetail(BaseModel):
    code: str
    message: str
    param: Optional[str] = Field(None, description="The request field at fault, when there is one.")
    fields: Optional[list[FieldError]] = None
    known_models: Optional[list[str]] = None
    known_adapters: Optional[list[str]] = Field(None, description="The model's usable adapters, when a request "
                                                                  "names one it lacks.")
    supported_sizes: Optional[list[str]] = Field(None, description="OpenAI endpoint: sizes the model accepts.")


class ErrorBody(BaseModel):
    error: ErrorDetail


class AdapterInfoOut(BaseModel):
    """One adapter of a model as GET /models lists it; ``loads`` false says why in ``problem``."""

    name: str
    source: Literal["operator", "shipped"]
    loads: bool
    problem: Optional[str] = None
    rank: Optional[int] = None
    target_modules: list[str] = []
    layers: Optional[int] = None
    size_bytes: Optional[int] = None


class ModelInfo(BaseModel):
    name: str
    kind: str
    output: str = Field("image", description="What the model makes: image or video.")
    edits: str = Field("none", description="What it edits: none, image (image-to-image) or inpaint (with a mask too).")
    pipeline_class: str
    dtype: str
    defaults: dict[str, Any]
    limits: ModelLimits = Field(description="What this model accepts here: its pipeline's limits within the "
                                            "service's CLUSCA_MAX_* ones. Requests outside them get a 422.")
    workers_alive: int
    queue_depth: int
    running_jobs: int
    workers: list[dict[str, Any]] = []
    parallel: dict[str, Any] = Field(default_factory=lambda: {"ulysses": 1, "ring": 1, "world": 1},
                                     description="How many ranks split each call (context parallelism): "
                                                 "ulysses x ring = world; 1 is one process.")
    adapters: list[AdapterInfoOut] = Field(default_factory=list, description="The model's LoRA adapters.")
    max_adapters: int = Field(0, description="Adapters one request may name (0: the model serves none).")


class ModelsResponse(BaseModel):
    default_model: str
    models: list[ModelInfo]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    redis: bool
    workers_alive: dict[str, int] = {}
    reason: Optional[str] = None
    # Ready, but something an operator should fix: a model whose long lane no live worker reads.
    warnings: list[str] = []


class OpenAIImageRequest(BaseModel):
    """OpenAI ``images.generate`` body; the extra fields expose this service's options."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(max_length=100_000)
    model: Optional[str] = Field(None, pattern=MODEL_NAME_PATTERN)
    n: Count = Field(1, ge=1)
    size: Optional[str] = Field(None, pattern=r"^(auto|\d{1,5}x\d{1,5})$", description="WIDTHxHEIGHT")
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    quality: Optional[str] = Field(None, max_length=32)
    style: Optional[str] = Field(None, max_length=32)
    user: Optional[str] = Field(None, max_length=256)
    # Extensions.
    negative_prompt: Optional[str] = Field(None, max_length=100_000)
    steps: Optional[Count] = Field(None, ge=1)
    guidance: Optional[float] = Field(None, ge=0, le=100, allow_inf_nan=False)
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    cache: Optional[CacheSettings] = None
    timeout_s: Optional[float] = TIMEOUT_FIELD
    adapters: Optional[list[AdapterChoice]] = ADAPTERS_FIELD
    cancel_on_disconnect: bool = CANCEL_ON_DISCONNECT_FIELD


class OpenAIImageEditRequest(OpenAIImageRequest):
    """The text fields of OpenAI's ``images.edit`` form (its ``image`` and ``mask`` are files);
    ``strength`` is this service's. The output has the image's size (``size``, if given, must be it).
    A form spells ``adapters`` as one field: JSON, or ``name[:scale],...``."""

    strength: Optional[float] = STRENGTH_FIELD
    adapters: Annotated[Optional[list[AdapterChoice]], BeforeValidator(_adapters_text)] = ADAPTERS_FIELD


class OpenAIImage(BaseModel):
    b64_json: Optional[str] = None
    url: Optional[str] = None
    revised_prompt: Optional[str] = None


class OpenAIImageResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
    id: str
    seed: Optional[int] = None
    timings: Timings
    cache_stats: Optional[RunStats] = None


class OpenAIVideoRequest(BaseModel):
    """OpenAI ``videos.create`` body; the extra fields expose this service's options."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={
        "examples": [{"prompt": "a paper boat on a river", "size": "832x480", "seconds": "4"}]})

    prompt: str = Field(max_length=100_000)
    model: Optional[str] = Field(None, pattern=MODEL_NAME_PATTERN)
    size: Optional[str] = Field(None, pattern=r"^(auto|\d{1,5}x\d{1,5})$", description="WIDTHxHEIGHT")
    seconds: Optional[str] = Field(None, pattern=r"^\d{1,3}(\.\d{1,3})?$",
                                   description="Length; frames = seconds x fps (rounded to what the model makes). "
                                               "num_frames, when given, wins.")

    @field_validator("seconds", mode="before")
    @classmethod
    def _number_as_text(cls, v: Any) -> Any:
        # OpenAI spells it as a string ("4"); a plain JSON number means the same.
        return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    # Extensions.
    num_frames: Optional[Count] = Field(None, ge=1)
    fps: Optional[int] = Field(None, ge=1, le=240)
    negative_prompt: Optional[str] = Field(None, max_length=100_000)
    steps: Optional[Count] = Field(None, ge=1)
    guidance: Optional[float] = Field(None, ge=0, le=100, allow_inf_nan=False)
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    output_format: Literal["mp4", "webp", "gif"] = "mp4"
    cache: Optional[CacheSettings] = None
    webhook_url: Optional[str] = Field(None, max_length=2048)
    timeout_s: Optional[float] = TIMEOUT_FIELD
    adapters: Annotated[Optional[list[AdapterChoice]], BeforeValidator(_adapters_text)] = ADAPTERS_FIELD


class OpenAIVideoError(BaseModel):
    code: str
    message: str


class OpenAIVideoDeleted(BaseModel):
    """OpenAI's answer to deleting a video: its stored bytes and record are gone."""

    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


class OpenAIVideo(BaseModel):
    """OpenAI's video object; ``status`` adds ``cancelled``, and the extra fields report this service's run."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: Literal["queued", "in_progress", "completed", "failed", "cancelled"]
    progress: int = Field(description="Percent of the denoising steps done.")
    created_at: int
    completed_at: Optional[int] = None
    expires_at: Optional[int] = None
    seconds: str
    size: str
    error: Optional[OpenAIVideoError] = None
    # Extensions.
    num_frames: int
    fps: int
    seed: Optional[int] = None
    output_format: str
    content_url: Optional[str] = Field(None, description="Where the bytes are, once completed.")
    cache: Optional[ClusCaConfig] = None
    cache_stats: Optional[RunStats] = None
    timings: Timings = Field(default_factory=Timings)
