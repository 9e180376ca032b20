"""A frozen copy of the ClusCa hooks as they were before the lean cached step.

The equivalence tests run the library's current hooks and this reference side by side on
copies of the same tiny models: the cached-step math must not drift. Nothing here is
maintained; only its install and run entry points are used.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from clusca.config import ClusCaConfig

from .hooks import apply_clusca, get_controller


@contextlib.contextmanager
def reference_run(model: torch.nn.Module, config: ClusCaConfig, num_inference_steps: int | None = None) -> Iterator:
    """``clusca_run`` of the reference hooks (no statistics object, just the controller)."""
    ctrl = get_controller(model) or apply_clusca(model, config)
    ctrl.start(config.validate(), num_inference_steps)
    try:
        yield ctrl
    finally:
        ctrl.stop()
