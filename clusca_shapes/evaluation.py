"""Judging the built-in model: its fixed evaluation prompts, and whether an image follows one.

This is the package's public door to its offline tools (the scene generator and the
pixel checker in :mod:`clusca_shapes.tools`): the service's tuner asks here, so no code
that runs in the service reaches into ``tools/``.
"""

from __future__ import annotations

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
