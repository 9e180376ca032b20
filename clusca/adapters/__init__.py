"""Per-architecture lean cached steps.

The module hooks alone give every architecture correct cached steps, but the model's own
forward still runs around them: norms whose outputs only feed predicted modules, the text
stream, rotary embeddings, the block bookkeeping. On a cached step that is most of the
operators, and on a GPU operators, not arithmetic, set the cost. An adapter replaces a
cached call by the few operators whose results reach the output, reading the same cache
state the hooks keep, with the same results (tested against the module-hook path).

An adapter returns ``None`` for a call it does not handle (an unusual argument, a stale
cache), and the call goes through the module hooks instead.
"""

from __future__ import annotations

import torch

from .flux import FluxLeanStep
from .hunyuan_video import HunyuanVideoLeanStep
from .sd3 import SD3LeanStep

_ADAPTERS = {"flux": FluxLeanStep, "hunyuan_video": HunyuanVideoLeanStep, "sd3": SD3LeanStep}


def adapter_for(model: torch.nn.Module, controller, hooks: list):
    """The lean cached step of ``model``'s architecture, or ``None`` when it has none (or the
    model's layout is not the one the adapter was written for)."""
    cls = _ADAPTERS.get(controller.arch.name)
    if cls is None:
        return None
    return cls.build(model, controller, hooks)
