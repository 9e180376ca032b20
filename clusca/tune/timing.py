"""Wall-clock speedups measured interleaved, robust to a machine that other work loads."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Mapping

GROUP = 3  # settings timed between two uncached runs
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def pick_clock(device: object, threads: int) -> str:
    """``cpu`` for a one-thread run on a CPU, else ``wall``.

    Such a run's wall clock on an idle machine is its CPU time, and the CPU time stays that on
    a machine other work shares, where the wall clock of a sub-second run swings several-fold.
    With more threads (their parallel efficiency differs between settings) or on an
    accelerator (the host waits, it does not compute) only the wall clock says it.
    """
    return "cpu" if str(device).split(":")[0] == "cpu" and threads == 1 else "wall"


@dataclass
class Timing:
    """What :func:`interleaved_speedups` measured, by both clocks (seconds per run)."""

    clock: str
    times: dict[str, dict[Hashable, list[float]]]  # clock -> setting -> its runs
    base: dict[str, list[float]]  # clock -> the uncached runs
    ratios: dict[str, dict[Hashable, list[float]]]  # clock -> setting -> ratio of each run

    def speedups(self, clock: str | None = None) -> dict[Hashable, float]:
        """Each setting's speedup by ``clock`` (default: the one chosen).

        By the wall clock, the median of the per-run ratios: load drifts, and a ratio of runs a
        few calls apart cancels the drift. By CPU time, which other work barely moves, the
        median of all uncached runs over the median of the setting's: a ratio per run would
        add the noise of two runs where the medians average it away.
        """
        clock = clock or self.clock
        if clock == "cpu":
            base = statistics.median(self.base[clock])
            return {k: base / max(statistics.median(v), 1e-9) for k, v in self.times[clock].items() if v}
        return {k: statistics.median(v) for k, v in self.ratios[clock].items() if v}


def interleaved_speedups(uncached: Callable[[], object], runs: Mapping[Hashable, Callable[[], object]],
                         rounds: int, group: int = GROUP, clock: str = "wall",
                         until: float | None = None, min_rounds: int = 3) -> Timing:
    """Speedup of each of ``runs`` over ``uncached``: the median over ``rounds`` of per-run ratios.

    Each round runs the settings in a rotated order with an uncached run before every
    ``group`` of them and one at the end; a setting's time is compared with the mean of the
    uncached runs just before and just after its group. Load from other work drifts over
    seconds, so a ratio of runs a few calls apart cancels it, where a ratio against one
    uncached run per round (many calls away on a long list) would not.

    Both clocks are read; ``clock`` (``wall`` or ``cpu``, :func:`pick_clock`) is the one
    :meth:`Timing.speedups` answers by default. With ``until`` (a ``time.perf_counter()``
    value) no round starts after it once ``min_rounds`` are done: a time budget holds even
    when the machine runs slower than the estimate the round count came from.
    """
    keys = list(runs)
    times = {c: {k: [] for k in keys} for c in CLOCKS}
    ratios = {c: {k: [] for k in keys} for c in CLOCKS}
    base: dict[str, list[float]] = {c: [] for c in CLOCKS}

    def timed(fn: Callable[[], object]) -> dict[str, float]:
        t = {c: f() for c, f in CLOCKS.items()}
        fn()
        return {c: f() - t[c] for c, f in CLOCKS.items()}

    for r in range(rounds):
        if until is not None and r >= min_rounds and time.perf_counter() > until:
            break
        order = keys[r % len(keys):] + keys[:r % len(keys)] if keys else []
        before = timed(uncached)
        for c in CLOCKS:
            base[c].append(before[c])
        for g in range(0, len(order), max(1, group)):
            chunk = order[g:g + max(1, group)]
            got = {k: timed(runs[k]) for k in chunk}
            after = timed(uncached)
            for c in CLOCKS:
                base[c].append(after[c])
                ref = 0.5 * (before[c] + after[c])
                for k, t in got.items():
                    times[c][k].append(t[c])
                    ratios[c][k].append(ref / max(t[c], 1e-9))
            before = after
    if clock not in CLOCKS:
        raise ValueError(f"clock: must be one of {', '.join(CLOCKS)}, got {clock!r}")
    return Timing(clock, times, base, ratios)
