"""Image quality against a reference, and the Pareto front of quality against speed.

Used by the tuner and by the benchmarks, so both measure with the same yardstick. Pure
numpy: no torch.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# The usual SSIM settings (Wang et al. 2004): an 11x11 Gaussian window of sigma 1.5 and
# the stabilising constants for a dynamic range of 1.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


def psnr(a: np.ndarray, b: np.ndarray, cap: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB of two images with values in [0, 1].

    Identical images give ``inf``, or ``cap`` when one is given (so that means stay finite).
    """
    a, b = _pair(a, b)
    mse = float(np.mean((a - b) ** 2))
    value = math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)
    return value if cap is None else min(cap, value)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian weights."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    w = np.exp(-(x**2) / (2.0 * sigma**2))
    return w / w.sum()


def _filter_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable weighted mean over every full window of an (H, W, C) array."""
    k = len(w)
    rows = np.lib.stride_tricks.sliding_window_view(x, k, axis=0) @ w  # (H-k+1, W, C)
    return np.lib.stride_tricks.sliding_window_view(rows, k, axis=1) @ w  # (H-k+1, W-k+1, C)


def ssim(a: np.ndarray, b: np.ndarray, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> float:
    """Mean structural similarity of two (H, W) or (H, W, C) images in [0, 1].

    Computed per channel over every full Gaussian window (no padding) and averaged.
    Images smaller than the window use one window the size of the image.
    """
    a, b = _pair(a, b)
    if a.ndim == 2:
        a, b = a[:, :, None], b[:, :, None]
    k = min(window, a.shape[0], a.shape[1])
    w = gaussian_window(k, sigma)
    mu_a, mu_b = _filter_valid(a, w), _filter_valid(b, w)
    var_a = _filter_valid(a * a, w) - mu_a**2
    var_b = _filter_valid(b * b, w) - mu_b**2
    cov = _filter_valid(a * b, w) - mu_a * mu_b
    num = (2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_a**2 + mu_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2)
    return float(np.mean(num / den))


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    return a, b


def dominators(points: Sequence[tuple[float, float]], i: int, strict: bool = True) -> list[int]:
    """Indices of the points that beat point ``i`` in both coordinates (higher is better).

    ``strict``: better in both coordinates. Otherwise at least as good in both and
    better in one (the usual Pareto dominance).
    """
    si, qi = points[i]
    out = []
    for j, (s, q) in enumerate(points):
        if j == i:
            continue
        if strict:
            if s > si and q > qi:
                out.append(j)
        elif s >= si and q >= qi and (s > si or q > qi):
            out.append(j)
    return out


def pareto_front(points: Sequence[tuple[float, float]], keep_ties: bool = True) -> list[int]:
    """Indices of the points no other point dominates (higher is better in both), by speed.

    Of identical points all are kept, or only the first with ``keep_ties=False``.
    """
    front = [i for i in range(len(points)) if not dominators(points, i, strict=False)]
    if not keep_ties:
        front = [i for i in front if all(tuple(points[j]) != tuple(points[i]) for j in range(i))]
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))
