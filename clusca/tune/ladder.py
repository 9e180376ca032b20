"""The ladder of successive halving: which images each rung sees, and how many settings go on."""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

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
