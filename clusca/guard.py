"""The divergence guard: a cached step expected to depart too far from the last fresh output
is computed in full instead.

The transformer's output gets Taylor factors of its own, from its full calls only: ``G_0``
the last fresh output, ``G_k`` its finite differences over the previous full calls (order
``max(1, order)``, so an order-0 run still measures how fast the output moves). A call due
to be cached ``d`` steps after the last full one is expected to depart from the last fresh
output by

    departure(d) = max over samples of  max(d ||G_1||, sum_{k >= 1} |c_k(d)| ||G_k||) / ||G_0||

``d ||G_1||`` is how far the output moves in ``d`` steps at its last rate of change (what
an order-0 prediction leaves out, and a damped predictor partly), the sum how far the run's
predictor, with its weights ``c_k``, extrapolates it (for Taylor order 1 the two are the
same: ``d`` times the output's relative change per step between the last two full calls).
Above ``guard_bound`` the call runs in full. Caching while the output still moves fast,
as in the first steps after warm-up, turns a small prediction error into another image;
the bound catches that before it is made.

Costs: per full call, one update of the output's factors and one norm per factor
(output-sized tensors, a fraction of one module's work); per cached call a few
multiplications on the host, decided before anything of the step runs, so a trip wastes
nothing. The norms are read on the host at the end of each full step; cached steps read
nothing from the device.
"""

from __future__ import annotations

from typing import Any

import torch

from .state import BranchState
from .taylor import Factors, coefficients


def output_tensor(out: Any) -> torch.Tensor | None:
    """The sample a transformer call returned: a tensor, the first of a tuple, or ``.sample``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0] if out and isinstance(out[0], torch.Tensor) else None
    sample = getattr(out, "sample", None)
    return sample if isinstance(sample, torch.Tensor) else None


def guard_order(order: int) -> int:
    """The order of the output's own factors: the run's, at least 1."""
    return max(1, order)


def observe(branch: BranchState, out: Any, order: int) -> int:
    """A full call of ``branch`` returned ``out``: fold it into the output's factors and measure
    their norms. Returns the change in bytes held."""
    y = output_tensor(out)
    held = branch.guard_factors
    before = held.nbytes() if held is not None else 0
    if y is None or y.ndim < 2 or not y.is_floating_point():
        branch.guard_factors = branch.guard_norms = None
        return -before
    y = y.detach().float()
    order = guard_order(order)
    d = branch.step - branch.guard_step
    if held is None or held.shape != y.shape or held.buffer.shape[0] != order + 1 or d <= 0:
        held = branch.guard_factors = Factors(y, order, keep_raw=False)
    else:
        held.update(y, d, order)
    branch.guard_step = branch.step
    # (factors, samples), read on the host here, once per full step: cached steps must stay
    # free of host reads (with announced steps they read nothing from the device).
    branch.guard_norms = held.buffer[: held.n].flatten(2).norm(dim=2).tolist() if held.n > 1 else None
    return held.nbytes() - before


def departure(branch: BranchState, steps_since_full: int, predictor: str = "taylor",
              scale: float = 0.5) -> float | None:
    """The relative departure from the last fresh output expected ``steps_since_full`` steps
    after it (``None`` before two full calls measured it): the larger of how far the output
    moves at its last rate of change and how far the run's predictor extrapolates it."""
    norms = branch.guard_norms
    if norms is None:
        return None
    d = steps_since_full
    c = coefficients(d, len(norms) - 1, predictor, scale)
    base = norms[0]
    worst = 0.0
    for j in range(len(base)):
        moved = d * norms[1][j]
        extrapolated = sum(abs(c[k]) * norms[k][j] for k in range(1, len(norms)))
        worst = max(worst, max(moved, extrapolated) / max(base[j], 1e-12))
    return worst


def trips(branch: BranchState, steps_since_full: int, bound: float, predictor: str = "taylor",
          scale: float = 0.5) -> bool:
    """Whether a call due to be cached must run in full: its expected departure exceeds ``bound``."""
    dep = departure(branch, steps_since_full, predictor, scale)
    return dep is not None and dep > bound
