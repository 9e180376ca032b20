"""Taylor factors of one module output, kept in one buffer and updated in place.

The one home of the prediction math: ``F_0 = y`` on a full step, ``F_{k+1} = (F_k - F_k') / d``
(finite differences against the previous full step's factors, ``d`` steps apart), and on a
cached step ``d`` steps after the last full one ``y_hat = sum_k F_k c_k(d)``, with the weights
``c_k`` of one of two predictors:

* ``taylor``: ``c_k = d^k / k!``, the Taylor series (TaylorSeer, ClusCa);
* ``hermite``: ``c_k = s^k H_k(s d) / k!`` with ``H_k`` the physicists' Hermite polynomials
  and a contraction ``s`` in (0, 1] (HiCache, arXiv 2508.16984). At ``s = 1/sqrt(2)`` the
  first-order weight equals Taylor's; a smaller ``s`` damps the extrapolation, the more so
  the higher the order and the further from the last full step.

Both use the same factors, so the predictor is a choice of weights only: it costs nothing
per step and can change from one run to the next.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .config import PREDICTORS


def _hermite(y, order: int) -> list:
    """``H_0(y) .. H_order(y)`` by the recurrence ``H_{k+1} = 2y H_k - 2k H_{k-1}``; ``y`` a
    number or a 0-d tensor (then every value is computed on its device)."""
    h = [y * 0 + 1, 2 * y]
    for k in range(1, order):
        h.append(2 * y * h[k] - 2 * k * h[k - 1])
    return h[: order + 1]


def _weights(order: int, predictor: str, scale: float) -> tuple[float, ...]:
    # The part of c_k that does not depend on d: 1 / k! (taylor), s^k / k! (hermite).
    s = scale if predictor == "hermite" else 1.0
    return tuple(s**k / math.factorial(k) for k in range(order + 1))


def coefficients(d: int, order: int, predictor: str = "taylor", scale: float = 0.5) -> tuple[float, ...]:
    """The weights ``c_0 .. c_order`` of a prediction ``d`` steps after the last full step."""
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor: must be one of {list(PREDICTORS)}, got {predictor!r}")
    w = _weights(order, predictor, scale)
    if predictor == "hermite":
        return tuple(float(h) * wk for h, wk in zip(_hermite(scale * d, order), w))
    return tuple(d**k * wk for k, wk in enumerate(w))


class CoefficientTable(NamedTuple):
    """What :func:`coefficients_from` needs as tensors, made once (a recorded graph may not
    copy from the host)."""

    powers: torch.Tensor  # k = 0..order
    weights: torch.Tensor  # the d-independent part of each c_k
    hermite_scale: float | None  # s, or None for the Taylor series


def coefficient_table(order: int, dtype: torch.dtype, device, predictor: str = "taylor",
                      scale: float = 0.5) -> CoefficientTable:
    k = torch.arange(order + 1, dtype=dtype, device=device)
    w = torch.tensor(_weights(order, predictor, scale), dtype=dtype, device=device)
    return CoefficientTable(k, w, scale if predictor == "hermite" else None)


def coefficients_from(d: torch.Tensor, table: CoefficientTable) -> torch.Tensor:
    """:func:`coefficients` as a tensor, from ``d`` held in a 0-d tensor: a recorded graph
    reads ``d`` from a buffer and computes its coefficients itself."""
    if table.hermite_scale is None:
        return d.pow(table.powers).mul_(table.weights)
    order = table.powers.numel() - 1
    return torch.stack(_hermite(d * table.hermite_scale, order)).mul_(table.weights)


def add_scaled(y: torch.Tensor, x: torch.Tensor, c) -> torch.Tensor:
    """``y += c * x`` in place, for a Python number ``c`` or a 0-d tensor (under torch.compile
    the coefficients are tensors, so a new step offset is new data, not a new graph)."""
    if isinstance(c, torch.Tensor):
        return y.addcmul_(x, c)
    return y.add_(x, alpha=c)


class Factors:
    """The Taylor factors of one output tensor: ``buffer[k]`` is ``F_k``.

    The buffer holds ``order + 1`` factors of the output's shape and is allocated once, on
    the first full step of a sequence; later full steps overwrite it in place, so a cached
    step only reads views made at allocation. ``raw`` keeps the true last output when fresh
    tokens edit ``F_0`` between full steps (the next finite difference must be taken between
    true outputs).
    """

    __slots__ = ("buffer", "views", "rows", "n", "raw")

    def __init__(self, y: torch.Tensor, order: int, keep_raw: bool,
                 buffers: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> None:
        # ``buffers``: (factor buffer, raw buffer) to use instead of new ones (kept from an
        # earlier run, so that graphs recorded then read this run's factors; clusca.capture).
        if buffers is not None:
            self.buffer, raw = buffers
        else:
            self.buffer, raw = torch.empty((order + 1, *y.shape), dtype=y.dtype, device=y.device), None
        # Plain indexing, not unbind: its views may be written in place with autograd on.
        self.views: tuple[torch.Tensor, ...] = tuple(self.buffer[k] for k in range(order + 1))
        # The same factors as (tokens, channels) tables, for row gathers and writes.
        table = self.buffer.view(order + 1, -1, y.shape[-1])
        self.rows: tuple[torch.Tensor, ...] = tuple(table[k] for k in range(order + 1))
        self.views[0].copy_(y)
        self.n = 1
        if not keep_raw:
            self.raw = None
        elif raw is not None:
            self.raw = raw.copy_(y)
        else:
            self.raw = y.detach().clone()

    def frozen(self) -> "Factors":
        """The same buffers with the count of valid factors fixed at its present value."""
        twin = Factors.__new__(Factors)
        for name in Factors.__slots__:
            setattr(twin, name, getattr(self, name))
        return twin

    @property
    def shape(self) -> torch.Size:
        return self.views[0].shape

    def nbytes(self) -> int:
        size = self.buffer.numel() * self.buffer.element_size()
        if self.raw is not None:
            size += self.raw.numel() * self.raw.element_size()
        return size

    def update(self, y: torch.Tensor, d: int, order: int) -> None:
        """Full step ``d`` steps after the previous one: fold the true output ``y`` in."""
        f = self.views
        if order == 0 or d <= 0:
            f[0].copy_(y)
            self.n = 1
        else:
            m = min(self.n, order)
            cur = y
            for k in range(m):
                old = self.raw if (k == 0 and self.raw is not None) else f[k]
                nxt = torch.sub(cur, old).div_(d)
                f[k].copy_(cur)
                cur = nxt
            f[m].copy_(cur)
            self.n = m + 1
        if self.raw is not None:
            self.raw.copy_(y)

    def predict(self, coeffs: tuple[float, ...], base: torch.Tensor | None = None, copy: bool = True) -> torch.Tensor:
        """``base + sum_k F_k coeffs[k]`` (``base`` optional) as a new tensor; ``coeffs`` are
        Python numbers or a tensor of them.

        With ``copy=False`` and a single factor and no base, ``F_0`` itself is returned: for
        callers that only read it before the next update.
        """
        f = self.views
        if base is not None:
            y = torch.add(base, f[0])
            first = 1
        elif self.n == 1:
            return f[0].clone() if copy else f[0]
        else:
            c = coeffs[1]
            y = torch.addcmul(f[0], f[1], c) if isinstance(c, torch.Tensor) else torch.add(f[0], f[1], alpha=c)
            first = 2
        for k in range(first, self.n):
            add_scaled(y, f[k], coeffs[k])
        return y
