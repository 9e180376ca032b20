"""Taylor factors of one module output, kept in one buffer and updated in place.

The one home of the prediction math: ``F_0 = y`` on a full step, ``F_{k+1} = (F_k - F_k') / d``
(finite differences against the previous full step's factors, ``d`` steps apart), and on a
cached step ``d`` steps after the last full one ``y_hat = sum_k F_k d^k / k!``.
"""

from __future__ import annotations

import math

import torch


def coefficients(d: int, order: int) -> tuple[float, ...]:
    """``d^k / k!`` for ``k = 0..order``."""
    return tuple(d**k / math.factorial(k) for k in range(order + 1))


def coefficient_table(order: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k, 1 / k!)`` for ``k = 0..order`` as tensors on ``device``: what
    :func:`coefficients_from` needs, made once (a recorded graph may not copy from the host)."""
    k = torch.arange(order + 1, dtype=dtype, device=device)
    return k, torch.tensor(coefficients(1, order), dtype=dtype, device=device)


def coefficients_from(d: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """:func:`coefficients` as a tensor, from ``d`` held in a 0-d tensor: a recorded graph
    reads ``d`` from a buffer and computes its coefficients itself."""
    k, inv_factorials = table
    return d.pow(k).mul_(inv_factorials)


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
