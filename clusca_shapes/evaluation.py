"""Judging the built-in model: its fixed evaluation prompts, and whether an image follows one.

This is the package's public door to its offline tools (the scene generator and the
pixel checker in :mod:`clusca_shapes.tools`): the service's tuner asks here, so no code
that runs in the service reaches into ``tools/``. The shipped style adapters live in
:data:`ADAPTERS_DIR`; :func:`style_check` tells whether an image shows an adapter's style.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def evaluation_prompts(n: int) -> tuple[list[str], Callable[[Any, int], bool]]:
    """The first ``n`` prompts of the fixed evaluation set, and ``follows(image, k)``: whether
    ``image`` shows what prompt ``k`` asks for (objects, colours, positions, relations, counts)."""
    from clusca_shapes.tools import checker, data

    items = data.eval_set(n)
    scenes = [scene for _, scene in items]

    def follows(image: Any, k: int) -> bool:
        return checker.check(image, scenes[k]).ok

    return [text for text, _ in items], follows


# The shipped LoRA style adapters, one PEFT folder each (clusca.lora.load_lora reads them).
ADAPTERS_DIR = Path(__file__).resolve().parent / "adapters"
ADAPTER_STYLES = ("outline", "pastel")


def style_check(style: str) -> Callable[[Any], bool]:
    """``shows(image)``: whether ``image`` shows the drawing style of the adapter ``style``."""
    from clusca_shapes.tools import checker

    if style not in ADAPTER_STYLES:
        raise ValueError(f"unknown style {style!r}; the adapters are {', '.join(ADAPTER_STYLES)}")
    return lambda image: checker.shows_style(image, style)
