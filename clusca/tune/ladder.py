"""The ladder of successive halving: which images each rung sees, and how many settings go on."""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

from .picks import front_layers
from .space import ETA

LEAN = 1.5  # how far the rungs' samples lean towards the hard items (1: not at all)


def hard_leaning_order(hardness: Mapping[int, float], sizes: Sequence[int]) -> list[int]:
    """The items in the order the rungs take them: each rung's prefix a sample of the whole
    set that leans towards its hard items.

    ``hardness`` maps an item to a score, higher meaning harder (for example minus the mean
    PSNR the reference settings reach on it); ``sizes`` are the rungs' image counts. A cached
    setting that fails does so on a few prompts; if the first rungs see only easy prompts, a
    setting that breaks on the others wins them and a robust one is dropped. A prefix of
    ``n`` items sits at the quantile midpoints ``(j + 0.5) / n`` of the set sorted hardest
    first, raised to :data:`LEAN` so that the hardest sixth holds about a third of it. Rungs that grow by
    :data:`ETA` keep the earlier midpoints, so each rung adds to the one before.
    """
    ranked = sorted(hardness, key=lambda i: (-hardness[i], i))
    m = len(ranked)
    order: list[int] = []
    used: set[int] = set()
    levels = [n for n in sizes if n < m]
    while levels and levels[-1] * ETA < m:
        levels.append(levels[-1] * ETA)
    for n in [*levels, m]:
        for j in range(n):
            if len(order) >= n:
                break
            u = (j + 0.5) / n
            r = min(m - 1, int(m * u ** LEAN))
            if r in used:  # an earlier level took it or a neighbour: the nearest free rank, harder first
                if n in levels and n != levels[0] and j % ETA == 1:
                    continue
                r = next(x for d in range(1, m) for x in (r - d, r + d) if 0 <= x < m and x not in used)
            used.add(r)
            order.append(ranked[r])
    return order


def survivors(count: int, rungs: Sequence[int], r: int, fits: Callable[[float, int], bool],
              cost_per_image: float) -> int:
    """How many of ``count`` settings that finished rung ``r - 1`` go on to rung ``r``.

    At least a third (:data:`ETA`); more when the rest of the ladder, each later rung keeping
    a third again, fits in the time left (``fits(seconds, finalists)``): a budget the plan's
    estimate underused is spent on keeping more settings alive rather than left over.
    """
    floor = max(1, math.ceil(count / ETA))
    best = floor
    for k in range(floor, count + 1):
        cost, alive = 0.0, k
        for j in range(r, len(rungs)):
            cost += alive * (rungs[j] - rungs[j - 1]) * cost_per_image
            if j + 1 < len(rungs):
                alive = max(1, math.ceil(alive / ETA))
        if not fits(cost, alive):
            break
        best = k
    return best


# Cached steps of the clustering modes cost time their FLOPs do not show, so a setting a
# little below a library preset in FLOPs speedup can still match it on the clock.
BAND_BELOW = 0.85
BAND_ABOVE = 1.25  # past the fastest preset's speed a setting only matters as a fallback


def band_of(anchor_speeds: Sequence[float]) -> tuple[float, float] | None:
    """The FLOPs-speedup range where the picks will fall, from the library presets' speedups:
    each pick is the most accurate setting at least as fast as one of them."""
    speeds = [s for s in anchor_speeds if s]
    if not speeds:
        return None
    return BAND_BELOW * min(speeds), BAND_ABOVE * max(speeds)


def keep_for_picks(points: Sequence[tuple[float, float]], keep: int,
                   band: tuple[float, float] | None = None) -> list[int]:
    """Which ``keep`` of ``points`` (FLOPs speedup, PSNR) go on to the next rung.

    Successive layers of the Pareto front, a layer too big for the room left spread along the
    speed axis (its ends included). Settings inside ``band`` (:func:`band_of`) come first:
    spreading over the whole front would spend the last places on settings far slower or far
    faster than any preset, which no pick can use, and drop the ones at the presets' speeds.
    """
    inside = [i for i, (s, _) in enumerate(points) if band is None or band[0] <= s <= band[1]]
    outside = [i for i in range(len(points)) if i not in set(inside)]
    chosen: list[int] = []
    for group in (inside, outside):
        for layer in front_layers([points[i] for i in group]):
            room = keep - len(chosen)
            if room <= 0:
                return sorted(chosen)
            layer = [group[i] for i in layer]
            if len(layer) <= room:
                chosen += layer
            else:
                step = (len(layer) - 1) / max(room - 1, 1)
                chosen += sorted({layer[round(j * step)] for j in range(room)})
    return sorted(chosen)
