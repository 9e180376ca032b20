"""Turn a validated request into a complete job (defaults filled, limits checked)."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import anyio

from ..registry import ModelEntry, Registry
from ..settings import Settings
from ..webhooks import WebhookError, check_url
from .errors import ApiError
from .schemas import CacheSettings

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


def resolve_cache(entry: ModelEntry, cache: CacheSettings | None) -> dict[str, Any]:
    settings = cache.model_dump(exclude_none=True) if cache is not None else {}
    if "modules" in settings:
        raise _bad("cache.modules", "module patterns are set by the operator, not per request")
    try:
        return entry.cache_config(settings).to_dict()  # the model's version of the preset, then the request's knobs
    except ValueError as exc:
        msg = str(exc)
        name, _, rest = msg.partition(": ")
        field = name if name.replace("_", "").isalnum() else "cache"
        raise _bad(f"cache.{field}" if field != "cache" else "cache", rest or msg) from None


async def resolve_job(*, registry: Registry, settings: Settings, model: str | None, prompt: str,
                      negative_prompt: str | None, width: int | None, height: int | None, steps: int | None,
                      guidance: float | None, seed: int | None, num_images: int, output_format: str,
                      cache: CacheSettings | None, webhook_url: str | None) -> tuple[ModelEntry, dict[str, Any]]:
    entry = model_entry(registry, model or settings.default_model)
    d = entry.defaults
    _check_text("prompt", prompt, settings.max_prompt_chars)
    _check_text("negative_prompt", negative_prompt, settings.max_prompt_chars)
    width = width or d.width
    height = height or d.height
    for field, v in (("width", width), ("height", height)):
        if v > settings.max_side:
            raise _bad(field, f"must be at most {settings.max_side}")
        if v % d.size_multiple:
            raise _bad(field, f"must be a multiple of {d.size_multiple} for model {entry.name!r}")
    if width * height > settings.max_pixels:
        raise _bad("width", f"width x height = {width * height} pixels exceeds the limit of {settings.max_pixels}")
    steps = steps or d.steps
    if steps > settings.max_steps:
        raise _bad("steps", f"must be at most {settings.max_steps}")
    if num_images > settings.max_images:
        raise _bad("num_images", f"must be at most {settings.max_images}")
    if webhook_url is not None:
        try:
            await anyio.to_thread.run_sync(lambda: check_url(webhook_url, allow_private=settings.webhook_allow_private))
        except WebhookError as exc:
            raise _bad("webhook_url", str(exc)) from None
    job = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "width": width,
        "height": height,
        "steps": steps,
        "guidance": float(d.guidance if guidance is None else guidance),
        "seed": secrets.randbelow(2**32) if seed is None else seed,
        "num_images": num_images,
        "output_format": output_format,
        "cache": resolve_cache(entry, cache),
        "webhook_url": webhook_url,
    }
    return entry, job


def idempotency_scope(identity: str, key: str | None) -> str | None:
    if key is None:
        return None
    if not key or len(key) > 255 or not key.isprintable():
        raise _bad("Idempotency-Key", "must be 1 to 255 printable characters")
    return hashlib.sha256(f"{identity}\0{key}".encode()).hexdigest()
