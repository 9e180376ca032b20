"""Graph capture of the lean cached step: launch a cached step as one CUDA graph.

On a GPU a cached step costs its kernel launches, not its arithmetic. With ``capture="auto"``
(the default) and the model on a CUDA device, the first cached step of each kind in a
branch (same input shapes, dtype, number of valid Taylor factors, fresh tokens or not) is
recorded into a CUDA graph, and the following ones replay it: one launch instead of a few
hundred.

A replay reads the memory it was recorded with, so everything a cached step reads lives in
buffers that outlive it:

* the Taylor factors, the weights and the step's constant scalars already do (allocated
  once per sequence, updated in place);
* the call's inputs (hidden states, timestep, guidance, pooled projections), the step
  offset ``d`` (from which the graph computes ``d^k / k!``), this step's fresh rows and the
  cluster index are copied into static buffers before each replay: device-to-device copies
  and one ``fill_`` of a number, none of which waits for the device.

The factor buffers and the recorded steps are kept per family of runs (same settings but
the seed, same call shape; :class:`KeptSteps`): a later run of the family gets the same
buffers slot by slot, so it replays from its first cached step. Whether a run records at
all is settled when it starts (``ClusCaController.start``): without a capable device
nothing is kept and cached steps never come here.

The first replay of each graph is checked against the eager step: the graph runs on a
snapshot of the state it mutates, the snapshot is put back, the eager step runs and its
result is the one used. A graph that fails to record or disagrees is dropped, the branch
goes on eagerly, and the reason is logged and reported in the run's statistics.

Whatever else decides in Python what a recorded step computes registers a *key part* on the
model (:func:`add_key_part`): a callable whose value joins the key a recorded step is kept
under, so a step is recorded once per value and replayed only under the same one. The LoRA
bank (``clusca.lora``) registers whether it adds a delta at all and how many images its rows
map onto; its slot and scale selection lives in buffers written in place, which a replay reads
like any other buffer.

``set_backend`` swaps the recorder: the tests use :class:`CallReplay`, which "records" by
keeping the function and "replays" by calling it on the same buffers, to check on a CPU
that a captured step reads nothing but its buffers, and :class:`OpReplay`, which replays
the recorded tensor operations without running the Python again, to check on a CPU that
nothing a replay should see is decided in Python or held in a tensor swapped for a new one.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .taylor import CoefficientTable, coefficient_table, coefficients_from

log = logging.getLogger("clusca.capture")

# What the graph and the eager step may differ by on the first replay (relative L2): kernel
# choice and the coefficients being tensors instead of numbers change the rounding only.
_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 2e-2, torch.float16: 5e-3}
# Reasons kept per run (the statistics list each reason once with its count).
_REASONS_KEPT = 8
# Device memory a run's recorded graphs may take (their private pools hold each recorded
# step's intermediates); past it, further kinds of cached steps run eagerly.
DEFAULT_BUDGET_MB = 2048


def kept_families() -> int:
    """``CLUSCA_CAPTURE_KEEP`` (default 1): how many (settings, input shape) families keep their
    cache buffers and graphs between runs."""
    try:
        return max(int(os.environ.get("CLUSCA_CAPTURE_KEEP", 1)), 0)
    except ValueError:
        return 1


def budget_bytes() -> int:
    """``CLUSCA_CAPTURE_BUDGET_MB`` (default 2048) in bytes."""
    try:
        mb = float(os.environ.get("CLUSCA_CAPTURE_BUDGET_MB", DEFAULT_BUDGET_MB))
    except ValueError:
        mb = DEFAULT_BUDGET_MB
    return int(max(mb, 0) * (1 << 20))


class CudaGraphs:
    """Records with ``torch.cuda.CUDAGraph``; replays it."""

    name = "cuda-graph"

    def unavailable(self, device: torch.device) -> str | None:
        if device.type != "cuda":
            return f"no CUDA device (the model is on {device.type})"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        return None

    def record(self, fn: Callable[[], torch.Tensor], restore: Callable[[], None]) -> tuple[Callable[[], None], Callable]:
        # One run on a side stream first, as CUDA graphs want (lazy library set-up must not
        # happen while recording); it writes the cache, so the state is put back after it.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        restore()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        return graph.replay, lambda: out

    def memory(self, device: torch.device) -> int:
        return torch.cuda.memory_reserved(device)


class CallReplay:
    """A stand-in recorder for devices without graphs: replaying calls ``fn`` again, on the
    very buffers it was recorded with. A step that read anything but its buffers would go
    stale under it exactly as under a CUDA graph."""

    name = "call-replay"

    def unavailable(self, device: torch.device) -> str | None:
        return None

    def record(self, fn: Callable[[], torch.Tensor], restore: Callable[[], None]) -> tuple[Callable[[], None], Callable]:
        out: list[torch.Tensor] = []

        def replay() -> None:
            out[:] = [fn()]

        return replay, lambda: out[0]

    def memory(self, device: torch.device) -> int:
        return 0


class OpReplay:
    """A stricter stand-in: recording runs ``fn`` once and keeps every tensor operation it
    dispatched, with the tensors each read; replaying runs those operations again, each on
    the tensors it read then (or on what an earlier operation of the replay made), without
    running ``fn``'s Python. As under a CUDA graph, a replay repeats what was recorded: the
    Python decisions taken while recording, and the very tensors read, so a step that swaps in
    a new tensor instead of writing a buffer in place goes stale here too."""

    name = "op-replay"

    def unavailable(self, device: torch.device) -> str | None:
        return None

    def record(self, fn: Callable[[], torch.Tensor], restore: Callable[[], None]) -> tuple[Callable[[], None], Callable]:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves, tree_map

        ops: list[tuple] = []

        class _Recorder(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                result = func(*args, **kwargs)
                ops.append((func, args, kwargs, result))
                return result

        with _Recorder():
            recorded = fn()
        restore()
        out: list[torch.Tensor] = []

        def replay() -> None:
            made: dict[int, torch.Tensor] = {}  # id of a recorded result -> the replay's

            def now(v: Any) -> Any:
                return made.get(id(v), v) if isinstance(v, torch.Tensor) else v

            for func, args, kwargs, result in ops:
                again = func(*tree_map(now, args), **tree_map(now, kwargs))
                for old, new in zip(tree_leaves(result), tree_leaves(again)):
                    if isinstance(old, torch.Tensor):
                        made[id(old)] = new
            out[:] = [made.get(id(recorded), recorded)]

        return replay, lambda: out[0]

    def memory(self, device: torch.device) -> int:
        return 0


_BACKEND: Any = CudaGraphs()


def set_backend(backend) -> Any:
    """Use ``backend`` to record cached steps from now on; returns the previous one."""
    global _BACKEND
    previous, _BACKEND = _BACKEND, backend
    return previous


@contextlib.contextmanager
def using_backend(backend) -> Iterator[None]:
    previous = set_backend(backend)
    try:
        yield
    finally:
        set_backend(previous)


def backend():
    return _BACKEND


@dataclass
class StaticInputs:
    """The buffers a captured step reads that change from one cached step to the next."""

    hs: torch.Tensor
    kwargs: dict[str, Any]  # the call's keyword arguments, tensors replaced by static copies
    tensor_names: tuple[str, ...]  # which of them are static copies
    d: torch.Tensor  # 0-d: steps since the last full one
    table: CoefficientTable  # the weights of the run's order and predictor
    rows: torch.Tensor | None  # (layers, batch * k * f) fresh rows of this step
    flat_index: torch.Tensor | None  # (batch * tokens,) cluster row of each token

    @classmethod
    def like(cls, hs: torch.Tensor, kwargs: dict, names: tuple[str, ...], config, order: int, rows, flat_index,
             dtype: torch.dtype) -> "StaticInputs":
        kw = dict(kwargs)
        present = []
        for n in names:
            v = kwargs.get(n)
            if isinstance(v, torch.Tensor):
                kw[n] = v.clone()
                present.append(n)
        dev = hs.device
        return cls(
            hs=hs.clone(), kwargs=kw, tensor_names=tuple(present),
            d=torch.zeros((), dtype=dtype, device=dev),
            table=coefficient_table(order, dtype, dev, config.predictor, config.hermite_scale),
            rows=rows.clone() if rows is not None else None,
            flat_index=flat_index.clone() if flat_index is not None else None,
        )

    def load(self, hs: torch.Tensor, kwargs: dict, d: int, rows, flat_index) -> None:
        """This step's values into the buffers; nothing here waits for the device."""
        self.hs.copy_(hs)
        for n in self.tensor_names:
            self.kwargs[n].copy_(kwargs[n])
        self.d.fill_(d)
        if rows is not None:
            self.rows.copy_(rows)
        if flat_index is not None and flat_index is not self._flat_src:
            self.flat_index.copy_(flat_index)
            self._flat_src = flat_index

    _flat_src: Any = None

    def coefficients(self) -> torch.Tensor:
        """The prediction weights for ``k = 0..order``, computed on the device (part of the graph)."""
        return coefficients_from(self.d, self.table)


@dataclass
class Captured:
    """One recorded cached step and the buffers it reads."""

    inputs: StaticInputs
    plan: Any  # the adapter's LeanPlan it was recorded from
    replay: Callable[[], None] | None = None
    output: Callable[[], torch.Tensor] | None = None
    failed: str | None = None  # why this kind of step runs eagerly
    nbytes: int = 0  # device memory the recording took


class Family:
    """The cache buffers and recorded steps of one (settings, input shape) family of runs.

    A new run of the family gets the same factor buffers, slot by slot, so the graphs
    recorded in an earlier run read this run's factors: the next request replays at once.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.graphs: dict[tuple, Captured] = {}
        self.run = 0  # the last run that used it

    def take(self, key: tuple, y: torch.Tensor, order: int, keep_raw: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        got = self.buffers.get(key)
        if got is None:
            buf = torch.empty((order + 1, *y.shape), dtype=y.dtype, device=y.device)
            got = self.buffers[key] = (buf, torch.empty_like(y) if keep_raw else None)
        return got


class KeptSteps:
    """Families kept between runs of one transformer (at most ``CLUSCA_CAPTURE_KEEP``; the
    least recently used go first, and never one the running run uses)."""

    def __init__(self) -> None:
        self.families: OrderedDict[tuple, Family] = OrderedDict()
        self.run = 0
        self.weights: tuple | None = None

    def begin_run(self, model: torch.nn.Module) -> None:
        self.run += 1
        # A graph reads the weights it was recorded with: parameters replaced or changed in
        # place (a LoRA fused, a dtype cast) make every kept family stale.
        weights = tuple((p.data_ptr(), p._version) for p in model.parameters())
        if weights != self.weights:
            self.families.clear()
            self.weights = weights

    def family(self, key: tuple) -> Family:
        fam = self.families.get(key)
        if fam is None:
            keep = kept_families()
            for old in [k for k, f in self.families.items() if f.run != self.run]:
                if len(self.families) < max(keep, 1):
                    break
                del self.families[old]
            fam = self.families[key] = Family()
        self.families.move_to_end(key)
        fam.run = self.run
        return fam

    def end_run(self) -> None:
        if kept_families() == 0:
            self.families.clear()

    def clear(self) -> None:
        self.families.clear()


_KEY_PARTS = "_clusca_capture_key_parts"


def add_key_part(model: torch.nn.Module, part: Callable[[], Any]) -> None:
    """Key the cached steps recorded for ``model`` by ``part()`` too (a hashable value read before
    every cached step): state that changes what a step computes without being one of its inputs'
    shapes, e.g. whether a hook adds anything at all. Register it on the model ClusCa is applied to."""
    parts = model.__dict__.setdefault(_KEY_PARTS, [])
    if part not in parts:
        parts.append(part)


def remove_key_part(model: torch.nn.Module, part: Callable[[], Any]) -> None:
    parts = model.__dict__.get(_KEY_PARTS, [])
    if part in parts:
        parts.remove(part)


def key_parts(model: torch.nn.Module) -> tuple:
    """The current values of ``model``'s key parts (``()`` when it has none)."""
    return tuple(part() for part in model.__dict__.get(_KEY_PARTS, ()))


def signature(hs: torch.Tensor, kwargs: dict, names: tuple[str, ...], extra: tuple) -> tuple:
    """What must match for a recorded step to be replayed for this call."""
    parts = [tuple(hs.shape), hs.dtype, hs.device]
    for n in names:
        v = kwargs.get(n)
        parts.append((n, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (n, v is None))
    return (*parts, *extra)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def tolerance(dtype: torch.dtype) -> float:
    return _TOLERANCE.get(dtype, 1e-4)


def note_failure(counters, reason: str) -> None:
    log.warning("clusca: cached steps run eagerly: %s", reason)
    reasons = counters.capture_failures
    if reason in reasons or len(reasons) < _REASONS_KEPT:
        reasons[reason] = reasons.get(reason, 0) + 1


def _mutated(plan) -> list[torch.Tensor]:
    """The cache tensors a cached step writes in place: ``F_0`` of each feed-forward with
    fresh tokens."""
    return [plan.ff[i].views[0] for i, w in enumerate(plan.work) if w is not None]


def captured_step(adapter, ctrl, hs: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    """The sample of this cached call replayed from a recorded graph (recording it first when
    this is the first step of its kind), or ``None``: the caller runs the step eagerly."""
    counters = ctrl.counters
    branch = ctrl.branch
    slots = branch.slots
    used = adapter.used_slots
    if any(slots[i].last_full != branch.last_full for i in used):
        return None
    clusters = branch.clusters.get("image") if ctrl.uses_clusters else None
    key = signature(hs, kwargs, adapter.input_names,
                    (branch.name, tuple(slots[i].n for i in used), clusters is not None and tuple(clusters.assign.shape),
                     *key_parts(ctrl.model)))
    graphs = ctrl.graphs()
    entry = graphs.get(key)
    d = branch.step - branch.last_full
    if entry is None:
        return _record(adapter, ctrl, hs, kwargs, key, d)
    if entry.failed is not None:
        return None
    inputs = entry.inputs
    table = ctrl.fresh_table("image", clusters) if inputs.rows is not None else None
    flat = clusters.flat_index if inputs.flat_index is not None else None
    inputs.load(hs, kwargs, d, table, flat)
    entry.replay()
    out = entry.output().clone()
    entry.plan.count(ctrl)
    counters.graph_replays += 1
    return out


def _record(adapter, ctrl, hs: torch.Tensor, kwargs: dict, key: tuple, d: int) -> torch.Tensor | None:
    counters = ctrl.counters
    rec = backend()
    x, temb = adapter.embed(hs, kwargs)
    eager_plan = adapter.plan(ctrl, x)
    plan = adapter.plan(ctrl, x, shared_coeffs=True)
    if eager_plan is None or plan is None:
        return None
    plan = plan.frozen()
    budget = budget_bytes()
    if counters.graph_bytes >= budget:
        ctrl.graphs()[key] = Captured(inputs=None, plan=plan, failed="capture memory budget reached")
        note_failure(counters, f"capture memory budget reached ({budget >> 20} MiB of graphs)")
        return None
    table = torch.stack(plan.rows) if plan.rows is not None else None
    inputs = StaticInputs.like(hs, kwargs, adapter.input_names, ctrl.config, ctrl.order, table, plan.flat_index, torch.float32)
    inputs._flat_src = plan.flat_index
    inputs.d.fill_(d)
    entry = Captured(inputs=inputs, plan=plan)
    ctrl.graphs()[key] = entry
    mutated = _mutated(plan)
    before = [t.clone() for t in mutated]

    def restore() -> None:
        for t, b in zip(mutated, before):
            t.copy_(b)

    def step() -> torch.Tensor:
        return adapter.run(plan, inputs.hs, inputs.kwargs, inputs.coefficients(), inputs.rows, inputs.flat_index)

    used_before = rec.memory(hs.device)
    try:
        entry.replay, entry.output = rec.record(step, restore)
        entry.replay()
        recorded = entry.output().clone()
    except Exception as exc:  # a step that cannot be recorded runs eagerly, with the reason kept
        restore()
        entry.failed = f"recording failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        entry.replay = entry.output = None
        note_failure(counters, entry.failed)
    else:
        entry.nbytes = max(0, rec.memory(hs.device) - used_before)
        counters.graph_bytes += entry.nbytes
        restore()
    del before
    out = adapter.run_embedded(eager_plan, x, temb, hs, kwargs)
    eager_plan.count(ctrl)
    if entry.failed is None:
        err = rel_error(recorded, out)
        if not err <= tolerance(out.dtype):
            entry.failed = f"replay differs from the eager step (relative error {err:.2e})"
            entry.replay = entry.output = None
            note_failure(counters, entry.failed)
        else:
            counters.graph_captures += 1
    return out
