"""The built-in model: a small FLUX-architecture text-to-image model of coloured shapes.

``WEIGHTS_DIR`` is the shipped checkpoint; ``ShapesFluxPipeline`` loads it offline.
The pipeline is imported lazily so that reading ``WEIGHTS_DIR`` or a checkpoint's index
(:func:`read_index`) does not import diffusers: the API reads the model's defaults,
tuned presets and limits from there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# What the pipeline accepts when its checkpoint's ``model_index.json`` declares no ``limits``
# (the registry reads the same numbers, so the API refuses what the pipeline would).
PIPELINE_LIMITS = {"max_side": 512, "max_pixels": 512 * 512, "max_steps": 1000, "max_images": 64}

# What a checkpoint's ``model_index.json`` means when it leaves a key out (older checkpoints):
# the resolution, steps, guidance and preset the model was trained and tuned for.
INDEX_DEFAULTS: dict[str, Any] = {"patch_size": 4, "default_width": 32, "default_height": 32, "default_steps": 40,
                                  "default_guidance": 5.0, "default_cache": "balanced"}

__all__ = ["INDEX_DEFAULTS", "PIPELINE_LIMITS", "WEIGHTS_DIR", "ShapesFluxPipeline", "read_index"]


def read_index(folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """A checkpoint's ``model_index.json`` (default: the shipped one) over :data:`INDEX_DEFAULTS`,
    with ``limits`` over :data:`PIPELINE_LIMITS` and ``cache_presets`` always present.

    An unreadable index reads as the defaults: the pipeline refuses such a folder when it
    is loaded, with its own message.
    """
    try:
        index = json.loads((Path(folder or WEIGHTS_DIR) / "model_index.json").read_text())
    except (OSError, ValueError):
        index = {}
    if not isinstance(index, dict):
        index = {}
    limits = index.get("limits") if isinstance(index.get("limits"), dict) else {}
    presets = index.get("cache_presets") if isinstance(index.get("cache_presets"), dict) else {}
    return {**INDEX_DEFAULTS, **index, "limits": {**PIPELINE_LIMITS, **limits}, "cache_presets": presets}


def __getattr__(name: str):
    if name == "ShapesFluxPipeline":
        from .pipeline import ShapesFluxPipeline

        return ShapesFluxPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
