"""The built-in model's runner: its own pipeline class from its shipped (or an operator's) checkpoint."""

from __future__ import annotations

from typing import Any

from service.registry import ModelEntry
from service.worker.runners.diffusers import DiffusersRunner


class BuiltinRunner(DiffusersRunner):
    @classmethod
    def from_pretrained(cls, entry: ModelEntry, dtype: Any) -> Any:
        import torch

        from clusca_shapes import WEIGHTS_DIR, ShapesFluxPipeline

        pipe = ShapesFluxPipeline.from_pretrained(entry.path or WEIGHTS_DIR)
        # Its checkpoint is float32; another dtype is a cast after loading.
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
