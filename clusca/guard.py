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


def observe(branch: BranchState, out: Any, order: int, paired: bool = False) -> int:
    """A full call of ``branch`` returned ``out``: fold it into the output's factors, measure
    their norms, and make this step every sample's last fresh one. ``paired``: the call's batch
    is two identical halves (guidance), whose samples are decided together. Returns the change
    in bytes held."""
    y = output_tensor(out)
    held = branch.guard_factors
    before = held.nbytes() if held is not None else 0
    if y is None or y.ndim < 2 or not y.is_floating_point():
        branch.guard_factors = branch.guard_norms = None
        branch.guard_fresh = []
        return -before
    y = y.detach().float()
    order = guard_order(order)
    d = branch.step - branch.guard_step
    if held is None or held.shape != y.shape or held.buffer.shape[0] != order + 1 or d <= 0:
        held = branch.guard_factors = Factors(y, order, keep_raw=False)
    else:
        held.update(y, d, order)
    branch.guard_step = branch.step
    branch.guard_fresh = [branch.step] * y.shape[0]
    branch.guard_pairs = paired and y.shape[0] % 2 == 0
    # (factors, samples), read on the host here, once per full step: cached steps must stay
    # free of host reads (with announced steps they read nothing from the device).
    branch.guard_norms = held.buffer[: held.n].flatten(2).norm(dim=2).tolist() if held.n > 1 else None
    return held.nbytes() - before


def observe_samples(branch: BranchState, y: torch.Tensor | None, samples: list[int]) -> None:
    """The guard computed ``samples`` of this cached step in full, with outputs ``y`` (one row
    per sample, in that order): fold each into its own row of the output's factors, over the
    steps since that sample's last fresh output, and make this step its last fresh one."""
    held, norms = branch.guard_factors, branch.guard_norms
    if held is None or y is None or y.shape[0] != len(samples) or y.shape[1:] != held.shape[1:]:
        return
    y = y.detach().float()
    step = branch.step
    for i, j in enumerate(samples):
        d = step - branch.guard_fresh[j]
        if d <= 0:
            continue
        cur = y[i]
        for k in range(held.n - 1):
            nxt = torch.sub(cur, held.views[k][j]).div_(d)
            held.views[k][j].copy_(cur)
            cur = nxt
        held.views[held.n - 1][j].copy_(cur)
        branch.guard_fresh[j] = step
        if norms is not None:
            for k in range(held.n):
                norms[k][j] = float(held.views[k][j].norm())


def departures(branch: BranchState, step: int, predictor: str = "taylor", scale: float = 0.5) -> list[float] | None:
    """Per sample, the relative departure from its last fresh output expected at ``step``
    (``None`` before two full calls measured it): the larger of how far the output moves at its
    last rate of change and how far the run's predictor extrapolates it."""
    norms = branch.guard_norms
    if norms is None:
        return None
    base = norms[0]
    out = []
    for j in range(len(base)):
        d = step - branch.guard_fresh[j]
        c = coefficients(d, len(norms) - 1, predictor, scale)
        moved = d * norms[1][j]
        extrapolated = sum(abs(c[k]) * norms[k][j] for k in range(1, len(norms)))
        out.append(max(moved, extrapolated) / max(base[j], 1e-12))
    return out


def over(branch: BranchState, values: list[float] | None, bound: float) -> list[int]:
    """The samples whose value is above ``bound``; the two halves of a guidance pair go together
    (one image: the guidance scale multiplies a gap between them)."""
    if not values:
        return []
    if branch.guard_pairs and len(values) % 2 == 0:
        h = len(values) // 2
        values = [max(values[j % h], values[j % h + h]) for j in range(len(values))]
    return [j for j, v in enumerate(values) if v > bound]


def trips(branch: BranchState, step: int, bound: float, predictor: str = "taylor", scale: float = 0.5) -> list[int]:
    """The samples of a call due to be cached at ``step`` whose expected departure exceeds ``bound``."""
    return over(branch, departures(branch, step, predictor, scale), bound)


def measured(errors: list[torch.Tensor]) -> list[float] | None:
    """Per sample, the largest relative error a cached step's fresh tokens measured (one
    ``(batch,)`` tensor per feed-forward module; read on the host here)."""
    if not errors:
        return None
    return torch.stack(errors).amax(0).tolist()
