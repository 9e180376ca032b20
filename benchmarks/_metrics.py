"""Small numeric helpers shared by the benchmarks: image quality, latency summaries, Pareto.

Pure numpy, no torch, so the tests of these helpers stay fast. Image quality and the Pareto
front come from `clusca.quality`, which the tuner uses too.
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence

import numpy as np

from clusca.quality import (  # noqa: F401  (one yardstick for the tuner and the benchmarks)
    SSIM_C1, SSIM_C2, SSIM_SIGMA, SSIM_WINDOW, dominators, gaussian_window, pareto_front, psnr, ssim,
)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (q in [0, 100]) of a non-empty sequence."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def speedup(baseline_times: Sequence[float], times: Sequence[float]) -> float:
    """Ratio of median times: how many times faster ``times`` is than the baseline."""
    return statistics.median(baseline_times) / statistics.median(times)
