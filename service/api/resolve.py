"""Turn a validated request into a complete job (defaults filled, limits checked)."""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import TYPE_CHECKING, Any

import anyio

from clusca.config import ClusCaConfig, ClusCaConfigError

from service.contract import IMAGE_FORMATS, VIDEO_FORMATS, JobRequest, denoised_steps
from service.registry import ModelEntry, ModelLimits, Registry
from service.settings import Settings
from service.webhooks import WebhookError, check_url
from service.api.errors import ApiError
from service.api.schemas import CacheSettings
from service.api.edit_inputs import EditInputs

if TYPE_CHECKING:
    from service.api.adapter_catalog import AdapterCatalog

# An edit's strength when a request gives none: most of the image redrawn, its layout kept; with a
# mask the masked region is redrawn from noise (what is outside it is kept whatever the strength).
DEFAULT_STRENGTH = 0.8
DEFAULT_INPAINT_STRENGTH = 1.0

# C0 controls other than tab / newline / carriage return, and DEL: never meaningful in a prompt.
_CONTROL = {c for c in range(32) if c not in (9, 10, 13)} | {127}


def _bad(field: str, message: str) -> ApiError:
    return ApiError(422, "validation_error", f"{field}: {message}", param=field,
                    fields=[{"field": field, "message": message}])


def model_entry(registry: Registry, name: str) -> ModelEntry:
    entry = registry.get(name)
    if entry is None:
        raise ApiError(404, "model_not_found", f"unknown model {name!r}; known models: {', '.join(registry.names)}",
                       param="model", known_models=registry.names)
    return entry


# Sizes the OpenAI images API and its SDKs use, offered when they fit the model.
OPENAI_SIZES = ("256x256", "512x512", "1024x1024", "1536x1024", "1024x1536", "1792x1024", "1024x1792")


def supported_sizes(entry: ModelEntry, lim: ModelLimits, limit: int = 12) -> list[str]:
    """Common ``WxH`` sizes the model accepts: the sizes it lists, else its default, square powers
    of two and OpenAI's sizes."""
    if lim.sizes is not None:
        return lim.sizes[:limit]
    d = entry.defaults
    candidates = [(d.width, d.height)]
    side = 8
    while side <= lim.max_side:
        candidates.append((side, side))
        side *= 2
    candidates += [tuple(int(x) for x in s.split("x")) for s in OPENAI_SIZES]
    out: list[str] = []
    for w, h in candidates:
        label = f"{w}x{h}"
        if label not in out and lim.size_problem(w, h) is None:
            out.append(label)
    return out[:limit]


def size_rule(lim: ModelLimits) -> str:
    return (f"width and height multiples of {lim.size_multiple} from {lim.min_side} to {lim.max_side}, "
            f"width x height at most {lim.max_pixels}")


def check_openai_size(registry: Registry, settings: Settings, model: str | None,
                      size: str | None) -> tuple[int | None, int | None]:
    """OpenAI's ``size`` as ``(width, height)`` for the model (``auto``/absent: its default);
    422 naming ``size`` and listing the sizes it supports when it does not fit."""
    if not size or size == "auto":
        return None, None
    entry = model_entry(registry, model or settings.default_model)
    lim = entry.limits_within(settings)
    w, h = (int(x) for x in size.split("x"))
    problem = lim.size_problem(w, h)
    if problem is None:
        return w, h
    sizes = supported_sizes(entry, lim)
    if lim.sizes is not None:
        message = f"{size} is not a size model {entry.name!r} draws well; {lim.sizes_text()}"
    else:
        message = (f"{size} is not supported by model {entry.name!r} ({problem[0]} {problem[1]}); "
                   f"supported sizes include {', '.join(sizes)} (any size with {size_rule(lim)})")
    raise ApiError(422, "validation_error", f"size: {message}", param="size",
                   fields=[{"field": "size", "message": message}], supported_sizes=["auto", *sizes])


def _check_text(field: str, text: str | None, limit: int) -> None:
    if text is None:
        return
    if len(text) > limit:
        raise _bad(field, f"is {len(text)} characters long; the limit is {limit}")
    if any(ord(ch) in _CONTROL for ch in text):
        raise _bad(field, "contains control characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(field, "contains unpaired surrogate characters") from None


def resolve_cache(entry: ModelEntry, cache: CacheSettings | None) -> ClusCaConfig:
    """The run's settings: the model's version of the preset, then the request's knobs. The schema
    has checked each knob on its own; what is left to the library is how they combine."""
    settings = cache.model_dump(exclude_none=True) if cache is not None else {}
    try:
        return entry.cache_config(settings)
    except ClusCaConfigError as exc:
        raise _bad(f"cache.{exc.field}", exc.reason) from None


@dataclass(frozen=True)
class JobAsk:
    """What a caller asked for, before defaults and limits: each router builds one from its body.

    ``images_field`` is how the body names the image count (a 422 names that field);
    ``output`` (``image`` or ``video``) is what the endpoint makes, when it serves only one.
    """

    prompt: str
    model: str | None = None
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    num_images: int = 1
    output_format: str | None = None
    cache: CacheSettings | None = None
    webhook_url: str | None = None
    num_frames: int | None = None
    fps: int | None = None
    timeout_s: float | None = None
    strength: float | None = None
    # The request's adapters as its body gives them (objects with ``name`` and ``scale``), unchecked.
    adapters: Any = None
    # The checked input image (and mask) of an edit (service/api/edit_inputs.py).
    edit: EditInputs | None = None
    images_field: str = "num_images"
    output: str | None = None

    @classmethod
    def of(cls, body: Any, **overrides: Any) -> "JobAsk":
        """The ask of a request body: every field the body has under the same name, then ``overrides``."""
        names = [f.name for f in dataclass_fields(cls) if f.name not in ("images_field", "output", "edit")]
        values = {n: getattr(body, n) for n in names if n not in overrides and hasattr(body, n)}
        return cls(**values, **overrides)


async def resolve_job(registry: Registry, settings: Settings, ask: JobAsk,
                      adapters: "AdapterCatalog | None" = None) -> tuple[ModelEntry, JobRequest]:
    """The complete job, or a 422 naming the first field at fault (``adapters``: what checks the
    request's adapters; without it a request naming any is refused)."""
    entry = model_entry(registry, ask.model or settings.default_model)
    d = entry.defaults
    if ask.output is not None and entry.output != ask.output:
        raise _bad("model", f"model {entry.name!r} makes {entry.output}s, not {ask.output}s")
    _check_text("prompt", ask.prompt, settings.max_prompt_chars)
    _check_text("negative_prompt", ask.negative_prompt, settings.max_prompt_chars)
    lim = entry.limits_within(settings)
    width, height = edit_size(entry, lim, ask)
    problem = lim.size_problem(width, height) or entry.split_problem(width, height)
    if problem:
        raise _bad(problem[0], f"{problem[1]} for model {entry.name!r}")
    steps = ask.steps or d.steps
    if steps < lim.min_steps:
        raise _bad("steps", f"must be at least {lim.min_steps} for model {entry.name!r}")
    if steps > lim.max_steps:
        raise _bad("steps", f"must be at most {lim.max_steps} for model {entry.name!r}")
    if ask.num_images > lim.max_images:
        raise _bad(ask.images_field, f"must be at most {lim.max_images} for model {entry.name!r}")
    num_frames, fps, output_format = ask.num_frames, ask.fps, ask.output_format
    if entry.output == "video":
        num_frames = num_frames or d.num_frames
        fps = fps or d.fps
        output_format = output_format or "mp4"
        if output_format not in VIDEO_FORMATS:
            raise _bad("output_format", f"model {entry.name!r} makes videos: one of {list(VIDEO_FORMATS)}")
        problem = lim.frames_problem(width, height, num_frames, ask.num_images)
        if problem:
            raise _bad(problem[0], f"{problem[1]} for model {entry.name!r}")
    else:
        for field, value in (("num_frames", num_frames), ("fps", fps)):
            if value is not None:
                raise _bad(field, f"model {entry.name!r} makes still images; it takes no {field}")
        output_format = output_format or "png"
        if output_format not in IMAGE_FORMATS:
            raise _bad("output_format", f"model {entry.name!r} makes still images: one of {list(IMAGE_FORMATS)}")
    strength = edit_strength(ask)
    run_steps = steps if strength is None else denoised_steps(steps, strength)  # JobRequest.cost's count
    cost = width * height * run_steps * ask.num_images * (num_frames or 1)
    problem = lim.cost_problem(cost, ask.images_field if ask.num_images > 1 else "steps")
    if problem:
        raise _bad(problem[0], f"{problem[1]} for model {entry.name!r}")
    if ask.timeout_s is not None and ask.timeout_s > settings.max_job_s:
        raise _bad("timeout_s", f"must be at most {settings.max_job_s:g} s (CLUSCA_MAX_JOB_S)")
    if ask.adapters and adapters is None:
        raise _bad("adapters", f"model {entry.name!r} serves no adapters here")
    uses = await adapters.check(entry, ask.adapters) if adapters is not None else ()
    webhook_url = ask.webhook_url
    if webhook_url is not None:
        try:
            await anyio.to_thread.run_sync(lambda: check_url(webhook_url, allow_private=settings.webhook_allow_private))
        except WebhookError as exc:
            raise _bad("webhook_url", str(exc)) from None
    job = JobRequest(
        prompt=ask.prompt,
        negative_prompt=ask.negative_prompt,
        width=width,
        height=height,
        steps=steps,
        guidance=float(d.guidance if ask.guidance is None else ask.guidance),
        seed=secrets.randbelow(2**32) if ask.seed is None else ask.seed,
        num_images=ask.num_images,
        output_format=output_format,  # type: ignore[arg-type] - the schema allows only the contract's formats
        cache=resolve_cache(entry, ask.cache),
        webhook_url=webhook_url,
        num_frames=num_frames,
        fps=fps,
        timeout_s=float(ask.timeout_s or settings.max_job_s),
        image=ask.edit.image.digest if ask.edit else None,
        mask=ask.edit.mask.digest if ask.edit and ask.edit.mask else None,
        strength=strength,
        adapters=uses,
    )
    return entry, job


def edit_size(entry: ModelEntry, lim: ModelLimits, ask: JobAsk) -> tuple[int, int]:
    """The output size: the image's for an edit (a 422 when the model cannot edit it, or when the
    request asks for another size), else the request's or the model's default."""
    edit = ask.edit
    if edit is None:
        if ask.strength is not None:
            raise _bad("strength", "needs an image to edit (image)")
        return ask.width or entry.defaults.width, ask.height or entry.defaults.height
    if entry.edits == "none":
        raise _bad("image", f"model {entry.name!r} does not edit images (it draws from text only); "
                            "models that do say so in `edits` (GET /models)")
    if edit.mask is not None and entry.edits != "inpaint":
        raise _bad("mask", f"model {entry.name!r} does not inpaint: send the image without a mask")
    width, height = edit.size
    problem = lim.size_problem(width, height)
    if problem is not None:
        sizes = supported_sizes(entry, lim)
        message = (f"is {width}x{height}, a size model {entry.name!r} does not take ({problem[1]}); "
                   f"supported sizes: {', '.join(sizes)}")
        raise ApiError(422, "validation_error", f"image: {message}", param="image",
                       fields=[{"field": "image", "message": message}], supported_sizes=sizes)
    for field, asked, have in (("width", ask.width, width), ("height", ask.height, height)):
        if asked is not None and asked != have:
            raise _bad(field, f"is {asked} but the image's is {have}: an edit keeps the image's size "
                              f"(leave {field} out, or resize the image)")
    return width, height


def edit_strength(ask: JobAsk) -> float | None:
    if ask.edit is None:
        return None
    if ask.strength is not None:
        return float(ask.strength)
    return DEFAULT_INPAINT_STRENGTH if ask.edit.mask is not None else DEFAULT_STRENGTH


def idempotency_scope(identity: str, key: str | None) -> str | None:
    """The stored name of ``key`` for this caller (keys are scoped per API key), or None.

    The header is a structured-field string in the IETF draft (``"abc"``); a bare token is
    taken as it is, and both spellings name the same key.
    """
    if key is None:
        return None
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not key or len(key) > 255 or not key.isprintable():
        raise _bad("Idempotency-Key", "must be 1 to 255 printable characters")
    return hashlib.sha256(f"{identity}\0{key}".encode()).hexdigest()


def request_fingerprint(endpoint: str, model: str, job: JobRequest, seed: int | None) -> str:
    """What makes two requests the same request: the resolved job (defaults filled in, so
    leaving a field out equals sending its default) with the client's own seed, not the one
    drawn for it. How the answer is wanted (``async``, ``Prefer``) is not part of it."""
    canonical = json.dumps({"endpoint": endpoint, "model": model, **job.to_dict(), "seed": seed}, sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
