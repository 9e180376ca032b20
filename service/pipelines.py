"""Load a registry entry into a warm pipeline (worker side only: imports torch lazily)."""

from __future__ import annotations

import inspect
import logging
from typing import Any

from .registry import ModelEntry

log = logging.getLogger("clusca.worker")


def resolve_device(entry: ModelEntry, default: str) -> str:
    device = entry.device if entry.device != "auto" else default
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(entry: ModelEntry, default_device: str) -> tuple[Any, str]:
    """Return ``(pipeline, device)`` for ``entry``, moved to its device, ready to call."""
    if entry.kind == "noop":
        from .noop import LegacyCallbackNoopPipeline, NoopPipeline

        if entry.options.get("legacy_callback"):
            return LegacyCallbackNoopPipeline(float(entry.options.get("step_delay_s", 0.0))), "cpu"
        return NoopPipeline(step_delay_s=float(entry.options.get("step_delay_s", 0.0)),
                            fail_on=entry.options.get("fail_on")), "cpu"

    import torch

    device = resolve_device(entry, default_device)
    dtype = getattr(torch, entry.dtype)
    if entry.kind == "builtin":
        from service.builtin import WEIGHTS_DIR, ShapesFluxPipeline

        pipe = ShapesFluxPipeline.from_pretrained(entry.path or WEIGHTS_DIR)
    else:
        import diffusers

        if entry.pipeline_class == "auto":
            cls = diffusers.DiffusionPipeline
        else:
            cls = getattr(diffusers, entry.pipeline_class, None)
            if not (inspect.isclass(cls) and issubclass(cls, diffusers.DiffusionPipeline)):
                raise ValueError(f"model {entry.name!r}: {entry.pipeline_class!r} is not a diffusers pipeline class")
        pipe = cls.from_pretrained(entry.path, torch_dtype=dtype)
    pipe = pipe.to(device)
    if entry.kind == "builtin" and dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    if getattr(pipe, "transformer", None) is not None:
        from clusca import apply_clusca

        apply_clusca(pipe.transformer)
    log.info("loaded model %s (%s) on %s", entry.name, type(pipe).__name__, device)
    return pipe, device


def call_parameters(pipe: Any) -> set[str]:
    """Keyword arguments the pipeline's ``__call__`` accepts (to skip unsupported ones)."""
    try:
        params = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {"*"}
    return set(params)

