"""Per-run, per-branch cache state (Taylor factors, clusters) and the run's counters."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from .diffusers_compat import BaseState

from .taylor import Factors


class SlotState:
    """Cache of one hooked module in one branch (e.g. ``cond``) of one run.

    ``factors`` holds the Taylor factors of the module's output tensors, in output order, but
    for the one at ``dead_pos`` (a text output while the text stream is dead), which a cached
    step answers with ``dead_kept`` or, when that is ``None``, a same-shaped input. A
    text-stream module keeps ``kept[j]`` instead of factors: its last full-step output, or
    ``None`` for "the current input" (see ``TextStreamHook``).
    """

    __slots__ = ("index", "factors", "kept", "dead_pos", "dead_kept", "n", "last_full", "in_shape", "structure",
                 "tokens", "flops")

    def __init__(self, index: int = 0) -> None:
        self.index = index  # the hooked module's slot
        self.factors: list[Factors] | None = None
        self.kept: list[torch.Tensor | None] | None = None
        self.dead_pos: int | None = None
        self.dead_kept: torch.Tensor | None = None
        self.n = 0  # number of valid factors per output (0: nothing cached yet)
        self.last_full = -1
        self.in_shape: torch.Size | None = None
        self.structure: tuple | None = None  # output layout: None = tensor, else tuple of present flags
        self.tokens = 0  # tokens of one uncached call (batch x sequence)
        self.flops = 0  # analytic FLOPs of one uncached call

    def factors_of(self, pos: int) -> Factors | None:
        """The factors of output ``pos`` (``None`` for the dead one)."""
        dead = self.dead_pos
        if dead is None or pos < dead:
            return self.factors[pos]
        return None if pos == dead else self.factors[pos - 1]

    def outputs(self, live: list[torch.Tensor], substitute: torch.Tensor | None) -> list[torch.Tensor]:
        """All outputs of a cached step from the live ones and the dead output's stand-in."""
        if self.dead_pos is None:
            return live
        live.insert(self.dead_pos, self.dead_kept if self.dead_kept is not None else substitute)
        return live

    def nbytes(self) -> int:
        total = sum(f.nbytes() for f in self.factors or ())
        if self.dead_kept is not None:
            total += self.dead_kept.numel() * self.dead_kept.element_size()
        for t in self.kept or ():
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def record(self, tensors: list[torch.Tensor], step: int, order: int, keep_raw: bool, buffers=None) -> None:
        """Full step ``step``: fold the module's true outputs into the factors (in place
        when the buffers of this sequence already exist). ``buffers(pos, tensor)``, when
        given, supplies the buffers of a new allocation (see ``Factors``)."""
        fs = self.factors
        fresh = (
            fs is None or self.last_full < 0 or len(fs) != len(tensors)
            or any(f.shape != t.shape or f.buffer.shape[0] != order + 1 for f, t in zip(fs, tensors))
        )
        if fresh:
            self.factors = [Factors(t.detach(), order, keep_raw, buffers(pos, t) if buffers is not None else None)
                            for pos, t in enumerate(tensors)]
        else:
            d = step - self.last_full
            for f, t in zip(fs, tensors):
                f.update(t.detach(), d, order)
        self.n = self.factors[0].n if self.factors else 1
        self.last_full = step


class GroupClusters:
    """k-means result of one token group (image or text) of one branch."""

    __slots__ = ("assign", "centroids", "k", "_flat_index")

    def __init__(self, assign: torch.Tensor, centroids: torch.Tensor, k: int) -> None:
        self.assign = assign  # (batch, tokens) int64
        # (batch, k, dim) float32, warm start of the next full step (with guidance pairs:
        # (batch / 2, k, 2 * dim), the two halves' features side by side)
        self.centroids = centroids
        self.k = k
        self._flat_index: torch.Tensor | None = None

    @property
    def flat_index(self) -> torch.Tensor:
        """(batch * tokens,) row of each token's cluster in a (batch * k, dim) table.

        Built on first use: only propagation (gamma > 0) reads it.
        """
        if self._flat_index is None:
            b = self.assign.shape[0]
            offsets = torch.arange(b, device=self.assign.device).unsqueeze(1) * self.k
            self._flat_index = (self.assign + offsets).reshape(-1)
        return self._flat_index

    def nbytes(self) -> int:
        # The flat index counts whether built yet or not: it has the assignment's size.
        return 2 * self.assign.numel() * self.assign.element_size() + self.centroids.numel() * self.centroids.element_size()


class BranchState(BaseState):
    """State of one denoising branch (one cache context, e.g. ``cond`` or ``uncond``)."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.reset()

    def reset(self, *args, **kwargs) -> None:
        self.slots: list[SlotState] = [SlotState(i) for i in range(self.num_slots)]
        self.clusters: dict[str, GroupClusters] = {}
        self.name = "call"  # the cache context this branch is (cond, uncond, ...)
        self.step = -1
        self.calls = 0
        self.last_full = -1
        self.full = True
        self.guidance_pair = False  # this full call's batch is two identical halves
        self.coeffs: tuple[float, ...] = (1.0,)
        self.signature: tuple | None = None
        self.probed = False
        self.fresh: dict[str, tuple] = {}  # group -> (step, clusters, (rows of every layer, their table))
        self.fresh_ahead: dict[str, tuple] = {}  # group -> (clusters, {step: (rows of every layer, table)})
        self.chain_acc: dict[int, list[torch.Tensor]] = {}  # block-chain sums being built this full step
        self.flops_call = 0  # analytic FLOPs of one uncached call
        self.flops_unhooked = 0  # part of it spent outside the hooked modules
        self.lean_plan = None  # the architecture adapter's per-sequence plan (see clusca.adapters)
        # The divergence guard (clusca.guard): Taylor factors of the transformer's output over
        # the full calls, the step of the last one, and the factors' norms per sample.
        self.guard_factors: Factors | None = None
        self.guard_step = -1
        self.guard_norms: list[list[float]] | None = None
        self.guard_fresh: list[int] = []  # per sample, the step of its last fresh output
        self.guard_pairs = False  # the batch is two identical halves: each image decided as one
        self.halves_equal = False  # this full call's batch is two identical halves
        self.batch = 0  # samples in this call
        self.tripped: list[int] = []  # samples the guard recomputes, decided before the step
        self.layout_trip = False  # a step due to be cached that the guard's layout window runs in full
        self.measure: list | None = None  # this cached step's measured errors (one tensor per module)
        self.recomputed: list[int] = []  # samples the guard computed in full this call
        self.refresh = None  # while recomputing: the samples' rows (index tensor) to re-anchor

    def drop_tensors(self) -> int:
        """Forget every cached tensor of this branch; returns the bytes freed."""
        freed = sum(st.nbytes() for st in self.slots) + sum(g.nbytes() for g in self.clusters.values())
        if self.guard_factors is not None:
            freed += self.guard_factors.nbytes()
        self.slots = [SlotState(i) for i in range(self.num_slots)]
        self.clusters = {}
        self.fresh = {}
        self.fresh_ahead = {}
        self.chain_acc = {}
        self.probed = False
        self.lean_plan = None
        self.guard_factors = None
        self.guard_step = -1
        self.guard_norms = None
        self.guard_fresh = []
        return freed


@dataclass
class Counters:
    """Run-wide counters; plain Python numbers so the hot path never syncs a device."""

    calls: int = 0
    sequences: int = 0  # denoising loops started in this run (steps are keyed by loop)
    full_steps: set = field(default_factory=set)
    cached_steps: set = field(default_factory=set)
    lean_steps: int = 0  # cached calls served by the architecture's lean cached step
    guard_trips: int = 0  # calls due to be cached that the divergence guard ran in full (clusca.guard)
    tokens_computed: int = 0
    tokens_uncached: int = 0
    flops: int = 0
    flops_uncached: int = 0
    cache_bytes: int = 0
    cache_bytes_peak: int = 0
    kmeans_s: float = 0.0
    kmeans_calls: int = 0
    kmeans_rounds: int = 0
    graph_captures: int = 0  # cached steps recorded as a graph (clusca.capture)
    graph_replays: int = 0  # cached steps replayed from one
    graph_bytes: int = 0  # device memory the recordings took
    capture_failures: dict = field(default_factory=dict)  # reason -> how often a step ran eagerly for it
    capture_unavailable: str | None = None  # why nothing could be recorded on this device

    def add_cache_bytes(self, delta: int) -> None:
        self.cache_bytes += delta
        if self.cache_bytes > self.cache_bytes_peak:
            self.cache_bytes_peak = self.cache_bytes
