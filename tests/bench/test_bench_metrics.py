"""Quality, latency and Pareto helpers of the benchmarks."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks._metrics import (  # noqa: E402
    dominators,
    gaussian_window,
    pareto_front,
    percentile,
    psnr,
    speedup,
    ssim,
)


def test_psnr_known_values():
    a = np.zeros((8, 8, 3))
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 0.1) == pytest.approx(20.0)  # mse 0.01
    assert psnr(a, a + 0.01) == pytest.approx(40.0)


def test_psnr_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        psnr(np.zeros((4, 4)), np.zeros((4, 5)))


def _ssim_direct(a: np.ndarray, b: np.ndarray, k: int = 11, sigma: float = 1.5) -> float:
    """Textbook SSIM: one weighted window at a time, one channel at a time."""
    g = gaussian_window(k, sigma)
    w = np.outer(g, g)
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for c in range(a.shape[2]):
        for y in range(a.shape[0] - k + 1):
            for x in range(a.shape[1] - k + 1):
                pa, pb = a[y:y + k, x:x + k, c], b[y:y + k, x:x + k, c]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va = (w * (pa - ma) ** 2).sum()
                vb = (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_the_window_by_window_definition():
    rng = np.random.default_rng(0)
    a = rng.random((16, 14, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    assert ssim(a, b) == pytest.approx(_ssim_direct(a, b), abs=1e-10)


def test_ssim_properties():
    rng = np.random.default_rng(1)
    a = rng.random((32, 32, 3))
    assert ssim(a, a) == pytest.approx(1.0)
    slight = np.clip(a + rng.normal(0, 0.02, a.shape), 0, 1)
    strong = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
    assert ssim(a, strong) < ssim(a, slight) < 1.0
    assert ssim(a, slight) == pytest.approx(ssim(slight, a))
    # Grey-level (2-D) images and images smaller than the window work too.
    assert ssim(a[:, :, 0], a[:, :, 0]) == pytest.approx(1.0)
    assert 0.0 < ssim(a[:6, :6], slight[:6, :6]) < 1.0


def test_percentile_interpolates():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == pytest.approx(2.5)
    assert percentile(list(range(101)), 95) == pytest.approx(95.0)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_speedup_uses_medians():
    # One outlier in each list does not move a median ratio.
    assert speedup([2.0, 2.0, 100.0], [1.0, 0.01, 1.0]) == pytest.approx(2.0)


def test_pareto_front_and_dominators():
    # (speed, quality); higher is better in both.
    pts = [(1.0, 30.0), (2.0, 25.0), (2.0, 20.0), (3.0, 22.0), (1.5, 29.0), (3.0, 22.0)]
    # (2, 20) is beaten by (2, 25) (weakly) and by (3, 22) (strictly); the two equal points
    # (3, 22) do not dominate each other.
    assert pareto_front(pts) == [0, 4, 1, 3, 5]
    assert dominators(pts, 2, strict=True) == [3, 5]
    assert dominators(pts, 2, strict=False) == [1, 3, 5]
    assert dominators(pts, 0, strict=True) == []
    # Strictly better in both is required for the target's "faster and better" wording.
    assert dominators([(1.0, 10.0), (2.0, 10.0)], 0, strict=True) == []
    assert dominators([(1.0, 10.0), (2.0, 10.0)], 0, strict=False) == [1]
