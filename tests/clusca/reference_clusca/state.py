"""Per-run, per-branch cache state (Taylor factors, clusters) and the run's counters."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.hooks.hooks import BaseState


class SlotState:
    """Cache of one hooked module in one branch (e.g. ``cond``) of one run.

    ``factors[j][k]`` is the k-th Taylor factor of the module's j-th output tensor.
    ``raw0[j]`` keeps the last full-step output when propagation edits ``factors[j][0]``
    in place, so the next finite difference is taken between true outputs.
    """

    __slots__ = ("factors", "raw0", "n", "last_full", "in_shape", "structure", "tokens", "flops")

    def __init__(self) -> None:
        self.factors: list[list[torch.Tensor]] | None = None
        self.raw0: list[torch.Tensor] | None = None
        self.n = 0  # number of valid factors per output
        self.last_full = -1
        self.in_shape: torch.Size | None = None
        self.structure: tuple | None = None  # output layout: None = tensor, else tuple of present flags
        self.tokens = 0  # tokens of one uncached call (batch x sequence)
        self.flops = 0  # analytic FLOPs of one uncached call

    def nbytes(self) -> int:
        total = 0
        for fs in self.factors or ():
            total += sum(f.numel() * f.element_size() for f in fs)
        for r in self.raw0 or ():
            total += r.numel() * r.element_size()
        return total


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
        self.slots: list[SlotState] = [SlotState() for _ in range(self.num_slots)]
        self.clusters: dict[str, GroupClusters] = {}
        self.step = -1
        self.calls = 0
        self.last_full = -1
        self.full = True
        self.guidance_pair = False  # this full call's batch is two identical halves
        self.coeffs: tuple[float, ...] = (1.0,)
        self.signature: tuple | None = None
        self.probed = False
        self.fresh: dict[str, tuple] = {}  # group -> (step, clusters, rows of every layer)
        self.fresh_ahead: dict[str, tuple] = {}  # group -> (clusters, {step: rows of every layer})
        self.chain_acc: dict[int, list[torch.Tensor]] = {}  # block-chain sums being built this full step
        self.flops_call = 0  # analytic FLOPs of one uncached call
        self.flops_unhooked = 0  # part of it spent outside the hooked modules


@dataclass
class Counters:
    """Run-wide counters; plain Python numbers so the hot path never syncs a device."""

    calls: int = 0
    sequences: int = 0  # denoising loops started in this run (steps are keyed by loop)
    full_steps: set = field(default_factory=set)
    cached_steps: set = field(default_factory=set)
    tokens_computed: int = 0
    tokens_uncached: int = 0
    flops: int = 0
    flops_uncached: int = 0
    cache_bytes: int = 0
    cache_bytes_peak: int = 0
    kmeans_s: float = 0.0
    kmeans_calls: int = 0
    kmeans_rounds: int = 0

    def add_cache_bytes(self, delta: int) -> None:
        self.cache_bytes += delta
        if self.cache_bytes > self.cache_bytes_peak:
            self.cache_bytes_peak = self.cache_bytes
