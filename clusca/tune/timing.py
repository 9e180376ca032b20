"""Wall-clock speedups measured interleaved, robust to a machine that other work loads."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Hashable, Mapping

GROUP = 3  # settings timed between two uncached runs


def interleaved_speedups(uncached: Callable[[], object], runs: Mapping[Hashable, Callable[[], object]],
                         rounds: int, group: int = GROUP) -> tuple[dict[Hashable, float], dict[Hashable, list[float]],
                                                                   list[float]]:
    """Speedup of each of ``runs`` over ``uncached``: the median over ``rounds`` of per-run ratios.

    Each round runs the settings in a rotated order with an uncached run before every
    ``group`` of them and one at the end; a setting's time is compared with the mean of the
    uncached runs just before and just after its group. Load from other work drifts over
    seconds, so a ratio of runs a few calls apart cancels it, where a ratio against one
    uncached run per round (many calls away on a long list) would not.

    Returns the speedups, every setting's times and every uncached time.
    """
    keys = list(runs)
    times: dict[Hashable, list[float]] = {k: [] for k in keys}
    ratios: dict[Hashable, list[float]] = {k: [] for k in keys}
    base: list[float] = []

    def clock(fn: Callable[[], object]) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    for r in range(rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)] if keys else []
        before = clock(uncached)
        base.append(before)
        for g in range(0, len(order), max(1, group)):
            chunk = order[g:g + max(1, group)]
            got = {k: clock(runs[k]) for k in chunk}
            after = clock(uncached)
            base.append(after)
            ref = 0.5 * (before + after)
            for k, t in got.items():
                times[k].append(t)
                ratios[k].append(ref / t)
            before = after
    return {k: statistics.median(v) for k, v in ratios.items() if v}, times, base
