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


# The edit set: the evaluation prompts that place one object, each edited where its object stands.
EDIT_SEED = 20261207
EDIT_POSITIONS = ("left", "right", "top", "bottom")
# The band of the image (of 32 pixels) repainted for an object at each position: wide enough to
# hold the largest object the prompts place there.
MASK_BOXES = {"left": (0, 0, 20, 32), "right": (12, 0, 32, 32), "top": (0, 0, 32, 20), "bottom": (0, 12, 32, 32)}


def edit_set(n: int) -> tuple[list[dict[str, Any]], Callable[[Any, int], bool]]:
    """``n`` inpainting edits, and ``follows(image, k)``: whether an edited image shows what edit
    ``k`` asks for.

    Each edit starts from an evaluation prompt that places one object on a side of the image
    (``base``, with its background named), masks the band of the image the object stands in
    (``box``: left, top, right, bottom in pixels; white = repaint), and asks for another object
    (another colour and shape) at the same place on the same background (``prompt``). Following
    means that object, alone of its colour, in its place.
    """
    import dataclasses

    import numpy as np

    from clusca_shapes.tools import checker, data

    items = [(t, s) for t, s in data.eval_set(max(4 * n, 40), forms=("one_placed",)) if s.position in EDIT_POSITIONS]
    edits, scenes = [], []
    for k, (_, scene) in enumerate(items[:n]):
        rng = np.random.default_rng([EDIT_SEED, k])
        obj = scene.objects[0]
        colours = [c for c in data.allowed_colours(scene.background, mono=False) if c != obj.colour]
        shapes = [s for s in data.SHAPES if s != obj.shape]
        new = dataclasses.replace(obj, colour=colours[int(rng.integers(len(colours)))],
                                  shape=shapes[int(rng.integers(len(shapes)))])
        base = dataclasses.replace(scene, mention_background=True)
        target = dataclasses.replace(base, objects=(new,))
        edits.append({"base": data.caption(base, rng), "prompt": data.caption(target, rng),
                      "box": MASK_BOXES[scene.position], "position": scene.position})
        scenes.append(target)

    def follows(image: Any, k: int) -> bool:
        return checker.check(image, scenes[k]).ok

    return edits, follows


# The shipped LoRA style adapters, one PEFT folder each (clusca.lora.load_lora reads them).
ADAPTERS_DIR = Path(__file__).resolve().parent / "adapters"
ADAPTER_STYLES = ("outline", "pastel")


def style_check(style: str) -> Callable[[Any], bool]:
    """``shows(image)``: whether ``image`` shows the drawing style of the adapter ``style``."""
    from clusca_shapes.tools import checker

    if style not in ADAPTER_STYLES:
        raise ValueError(f"unknown style {style!r}; the adapters are {', '.join(ADAPTER_STYLES)}")
    return lambda image: checker.shows_style(image, style)
