"""The Pareto front of quality against speed, and which points become the presets."""

from __future__ import annotations

from typing import Any, Mapping, Sequence


from ..config import PRESETS, ClusCaConfig
from .. import quality


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """The front of ``points`` (speed, quality), by speed; of identical points the first only,
    so that one setting measured twice is not picked twice."""
    return quality.pareto_front(points, keep_ties=False)


def front_layers(points: Sequence[tuple[float, float]]) -> list[list[int]]:
    """Non-dominated sorting: the front, then the front of the rest, and so on."""
    left = list(range(len(points)))
    layers = []
    while left:
        layer = [left[i] for i in pareto_front([points[i] for i in left])]
        layers.append(layer)
        chosen = set(layer)
        left = [i for i in left if i not in chosen]
    return layers


STEP = 1.1  # each preset at least this much faster than the tuned one before it


def pick_presets(points: Sequence[tuple[float, float]], anchors: Mapping[str, float],
                 eligible: Sequence[bool] | None = None, step: float = STEP) -> dict[str, int]:
    """The index picked for each preset in ``anchors`` (preset name -> the speed to match),
    taken in the order given (``quality``, ``balanced``, ``fast``).

    Among the eligible points on the Pareto front: the highest quality at a speed of at least
    the anchor and at least ``step`` times the speed of the preset picked before it (ties: the
    faster), so that the presets are distinct steps of speed; when no point is that fast, the
    step is dropped; when none is as fast as the anchor either, the fastest point of the front.
    """
    idx = [i for i in range(len(points)) if eligible is None or eligible[i]]
    if not idx:
        return {}
    front = [idx[i] for i in pareto_front([points[i] for i in idx])]
    out: dict[str, int] = {}
    prev: int | None = None
    for name, speed in anchors.items():
        targets = [speed] if prev is None else [max(speed, step * points[prev][0]), speed]
        for target in targets:
            fast_enough = [i for i in front if points[i][0] >= target]
            if fast_enough:
                out[name] = max(fast_enough, key=lambda i: (points[i][1], points[i][0]))
                break
        else:
            out[name] = max(front, key=lambda i: (points[i][0], points[i][1]))
        prev = out[name]
    return out


def preset_overrides(name: str, config: ClusCaConfig) -> dict[str, Any]:
    """``config`` as the registry spells a tuned preset: the fields that differ from the library's ``name``."""
    base = PRESETS[name].to_dict()
    return {k: v for k, v in config.to_dict().items() if k not in ("modules",) and base.get(k) != v}
