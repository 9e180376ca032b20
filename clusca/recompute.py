"""The divergence guard's recomputation: the samples it trips on a cached call are run again in
full, on their own rows of the call, and only their rows of each module's cache state are
re-anchored on the true outputs (see :mod:`clusca.guard` for when a sample trips)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from . import guard
from .calls import device_of, first_tensor
from .state import SlotState

if TYPE_CHECKING:
    from .controller import ClusCaController


def recompute(ctrl: ClusCaController, forward, args: tuple, kwargs: dict, samples: list[int], out: Any = None) -> Any:
    """Compute ``samples`` of this cached call in full and re-anchor their cache state.

    ``out`` is the cached step's output for the whole batch (``None``: no cached step ran,
    and ``samples`` is the whole batch). The samples are run on their own, through the
    hooks in recompute mode (``branch.refresh``): each module computes its true output, and
    the rows of these samples in its factors are re-anchored on it (:func:`reanchor`); the
    other samples keep exactly the state and output of their cached step. Returns the
    call's output, the recomputed samples' rows replaced.
    """
    branch = ctrl.branch
    b = branch.batch
    whole = out is None or len(samples) == b
    x = first_tensor(args, kwargs)
    idx = torch.tensor(samples, dtype=torch.long, device=x.device if x is not None else None)
    if not whole:
        args, kwargs = batch_rows(args, kwargs, b, idx)
    branch.refresh, branch.full = idx, True
    try:
        sub = forward(*args, **kwargs)
    finally:
        branch.refresh, branch.full = None, False
    y = guard.output_tensor(sub)
    guard.observe_samples(branch, y, samples)
    branch.recomputed = samples
    if out is None:
        return sub
    target = guard.output_tensor(out)
    if y is None or target is None or y.shape[1:] != target.shape[1:]:
        return sub if whole else out
    target.index_copy_(0, idx, y.to(target.dtype))
    return out


def guard_after(ctrl: ClusCaController, forward, args: tuple, kwargs: dict, out: Any) -> Any:
    """A cached call ran: the samples the guard trips (decided before the step, or measured
    at its fresh tokens) are computed in full; see :func:`recompute`."""
    branch = ctrl.branch
    samples = branch.tripped
    if branch.measure is not None:
        cfg = ctrl.config
        errors = guard.measured(branch.measure)
        if errors is None:  # no fresh tokens this step (a compiled or recorded one): estimate
            samples = guard.trips(branch, branch.step, cfg.guard_bound, cfg.predictor if ctrl.order else "taylor",
                                  cfg.hermite_scale)
        else:
            samples = guard.over(branch, errors, cfg.guard_bound)
        branch.measure = None
        if ctrl.parallel is not None:  # each rank measured its own shard's fresh tokens
            samples = ctrl.parallel.union(samples, branch.batch, device_of(ctrl.model))
    if not samples:
        return out
    return recompute(ctrl, forward, args, kwargs, samples, out)


def reanchor(ctrl: ClusCaController, st: SlotState, tensors: list[torch.Tensor]) -> None:
    """Recompute mode: re-anchor the rows ``branch.refresh`` of ``st``'s factors on the module's
    true outputs ``y`` (``tensors``), those rows only. Order 0: ``F_0 <- y``. Higher orders:
    the prediction becomes the secant from the last full step's output ``F_0`` (its true
    value, where fresh tokens edited ``F_0`` since) through ``y``: ``F_1 <- (y - F_0) / c_1``,
    ``F_k <- 0`` beyond, so it gives ``y`` at this step and goes on at the rate just measured
    (for Taylor order 1 the line a full step here would have started). The last full step
    stays the schedule's, so a sample's state never depends on its batch mates'."""
    rows = ctrl.branch.refresh
    dead = st.dead_pos
    if dead is not None and dead < len(tensors):
        tensors = tensors[:dead] + tensors[dead + 1:]
    fs = st.factors
    if not fs or len(fs) != len(tensors):
        return
    coeffs = ctrl.coeffs_for(st)
    for f, t in zip(fs, tensors):
        if t.shape[0] != rows.numel() or t.shape[1:] != f.shape[1:]:
            continue
        y = t.detach().to(f.buffer.dtype)
        if f.n == 1 or not coeffs[1]:
            f.views[0].index_copy_(0, rows, y)
            continue
        base = (f.raw if f.raw is not None else f.views[0]).index_select(0, rows)
        f.views[0].index_copy_(0, rows, base)
        f.views[1].index_copy_(0, rows, y.sub(base).div_(coeffs[1]))
        for k in range(2, f.n):
            f.views[k].index_fill_(0, rows, 0)


def batch_rows(args: tuple, kwargs: dict, batch: int, idx: torch.Tensor) -> tuple[tuple, dict]:
    """The call's arguments for the samples ``idx`` only: every tensor argument with the batch
    as its first dimension, but position ids (``*_ids``, one row per token, the same for every
    sample)."""
    def rows(name: str | None, v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == batch and not (name or "").endswith("_ids"):
            return v.index_select(0, idx.to(v.device))
        return v

    return tuple(rows(None, a) for a in args), {k: rows(k, v) for k, v in kwargs.items()}
