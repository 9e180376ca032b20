"""The built-in model: a small FLUX-architecture text-to-image model of coloured shapes.

``WEIGHTS_DIR`` is the shipped checkpoint; ``ShapesFluxPipeline`` loads it offline.
The pipeline is imported lazily so that reading ``WEIGHTS_DIR`` does not import diffusers.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# What the pipeline accepts when its checkpoint's ``model_index.json`` declares no ``limits``
# (the registry reads the same numbers, so the API refuses what the pipeline would).
PIPELINE_LIMITS = {"max_side": 512, "max_pixels": 512 * 512, "max_steps": 1000, "max_images": 64}

__all__ = ["PIPELINE_LIMITS", "WEIGHTS_DIR", "ShapesFluxPipeline"]


def __getattr__(name: str):
    if name == "ShapesFluxPipeline":
        from .pipeline import ShapesFluxPipeline

        return ShapesFluxPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
