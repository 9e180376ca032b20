"""The divergence guard: a sample whose cached step errs too far from its true output is
computed in full for that step, on its own; its batch mates keep their cached step.

What is judged, per sample (the two halves of a guidance pair as one image, since the
guidance scale multiplies any gap between them):

* ClusCa (fresh tokens): the step's *measured* error. A cached step recomputes one token per
  cluster in every image feed-forward module anyway; before those outputs are written back,
  the gap between them and what the prediction said for the same tokens is

      e = max over the feed-forward modules of ||y_fresh - y_pred|| / ||y_fresh||

  over the sample's fresh rows: the module's relative prediction error on a random sample of
  its tokens (one drawn per cluster), so an estimate of its error over all of them, of this
  very step, at the cost of one gather and two norms per module (read on the host once per
  cached step, after it ran). Compiled or recorded cached steps measure nothing and fall back
  to the estimate below.
* FORA and TaylorSeer (no fresh tokens): an *expected* departure, decided before the step.
  The transformer's output gets Taylor factors of its own over the full steps (``G_0`` the
  last fresh output, ``G_k`` its finite differences, order ``max(1, order)``); ``d`` steps
  after a sample's last fresh output it is expected to depart from it by

      departure(d) = max(d ||G_1||, sum_{k >= 1} |c_k(d)| ||G_k||) / ||G_0||

  how far the output moves in ``d`` steps at its last rate of change (what an order-0
  prediction leaves out) and how far the run's predictor, with its weights ``c_k``,
  extrapolates it.

A sample over ``guard_bound`` is recomputed: the samples that tripped are run through the
transformer alone (their rows of the call's tensors), their outputs replace theirs in the
call's output, and every module re-anchors those rows of its factors on its true output
(``ClusCaController.reanchor``: order 0 reuses it; higher orders take the secant from the
last full step's output through it, the line a full step here would start for Taylor order
1). The schedule's last full step stays the same for the whole batch, so a sample's images
and state never depend on its batch mates: each one gets what its solo run gets.

The bound. Both quantities are relative errors of one step, so one bound serves both. On
the built-in model (40 steps, guidance 5; ``benchmarks/guard_sweep.py``) the measured error
of the first cached step after warm-up (``d = 1``) is 0.09 to 0.18 on runs that end within
a few dB of the uncached image, and it grows about linearly with ``d`` for order 0 (up to
0.33 at ``d = 2`` on the model's presets); on the runs that collapse (the paper's ``fast``
settings, the Taylor extrapolation of a slope measured while the output moved 80% a step)
it is 0.29 to 0.30 at ``d = 1`` and 0.56 to 0.57 at ``d = 2``. The default 0.35 sits above
what the model's own presets reach, so they rarely trip, and below what a collapse reaches
within two steps; ``benchmarks/guard_sweep.py`` measures it against a stricter 0.25.

The layout window. What no bound catches is a sample on a knife's edge whose step error is
ordinary but whose trajectory turns on it ("a yellow circle to the left", seed 11, on the
built-in model: its error at step 3 is the median of its peers', yet caching step 3 or step 4
of 40 sends it to another image, under every setting, the model's old presets included).
The image's layout is decided in the first steps, so with the guard on every step in the
leading ``guard_layout`` share of the run's steps (default 0.125: 5 of 40) is full, whatever
the schedule says; a step it adds counts as a trip. It depends on the step alone, so batch
mates and ranks agree on it, and a schedule whose warm-up already covers it (the built-in
model's presets warm up for 5 steps) pays nothing. It needs the step count
(``num_inference_steps`` of ``clusca_run``; the service always passes it).

Costs: per full step, one update of output-sized factors and one norm per factor (read on
the host at its end); per cached ClusCa step the measured error (above); per cached step of
the other modes a few multiplications on the host, before it runs. A trip costs a full step
of the tripped samples.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .state import BranchState
from .taylor import Factors, coefficients


def layout_steps(num_inference_steps: int | None, share: float) -> int:
    """How many leading steps the guard computes in full: ``ceil(share * steps)``; none when the
    run does not know its step count."""
    if not num_inference_steps or share <= 0:
        return 0
    return math.ceil(share * num_inference_steps - 1e-9)


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


def observe(branch: BranchState, out: Any, order: int, paired: bool = False, estimate: bool = True) -> int:
    """A full call of ``branch`` returned ``out``: fold it into the output's factors, measure
    their norms, and make this step every sample's last fresh one. ``paired``: the call's batch
    is two identical halves (guidance), whose samples are decided together. ``estimate=False``:
    every cached step of the run measures its own error (eager ClusCa), so the output's factors,
    which only the estimate reads, are not kept. Returns the change in bytes held."""
    y = output_tensor(out)
    held = branch.guard_factors
    before = held.nbytes() if held is not None else 0
    if y is None or y.ndim < 2 or not y.is_floating_point():
        branch.guard_factors = branch.guard_norms = None
        branch.guard_fresh = []
        return -before
    if estimate:
        y, d, order = y.detach().float(), branch.step - branch.guard_step, guard_order(order)
        if held is None or held.shape != y.shape or held.buffer.shape[0] != order + 1 or d <= 0:
            held = branch.guard_factors = Factors(y, order, keep_raw=False)
        else:
            held.update(y, d, order)
        # (factors, samples), read on the host here, once per full step: cached steps must stay
        # free of host reads (with announced steps they read nothing from the device).
        branch.guard_norms = held.buffer[: held.n].flatten(2).norm(dim=2).tolist() if held.n > 1 else None
    else:
        held = branch.guard_factors = branch.guard_norms = None
    branch.guard_step = branch.step
    branch.guard_fresh = [branch.step] * y.shape[0]
    branch.guard_pairs = paired and y.shape[0] % 2 == 0
    return (held.nbytes() if held is not None else 0) - before


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


def measured(errors: list[tuple[torch.Tensor, torch.Tensor, int]]) -> list[float] | None:
    """Per sample, the largest relative error a cached step's fresh tokens measured: ``errors``
    holds, per feed-forward module, what the prediction said for the fresh rows, their true
    outputs and the batch size. Modules of one shape are measured together (a handful of
    operators per step, not per module) and read on the host once."""
    if not errors:
        return None
    groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for pred, fresh, batch in errors:
        groups.setdefault((tuple(fresh.shape), batch), []).append((pred, fresh))
    per_module = []
    for (_, batch), pairs in groups.items():
        pred = torch.stack([p for p, _ in pairs]).reshape(len(pairs), batch, -1).float()
        fresh = torch.stack([f for _, f in pairs]).reshape(len(pairs), batch, -1).float()
        gap = torch.linalg.vector_norm(fresh - pred, dim=2)
        per_module.append(gap.div_(torch.linalg.vector_norm(fresh, dim=2).clamp_min_(1e-12)))
    worst = per_module[0] if len(per_module) == 1 else torch.cat(per_module)
    return worst.amax(0).tolist()
