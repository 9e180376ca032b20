"""Which tokens a cached step recomputes: one (or ``fresh_tokens``) per cluster, drawn at random.

One random score per (step, layer, token position), shared by the whole batch, drawn from a
generator seeded by (seed, step, group); each sample takes, per cluster, its member(s) with
the highest score, so a sample's choice never depends on the other samples in its batch.
"""

from __future__ import annotations

import torch

from .config import ClusCaConfig
from .state import BranchState, GroupClusters
from .taylor import add_scaled

_MASK64 = (1 << 63) - 1
_OFFSETS_KEPT = 64
# Bound on the draws kept across runs: 16 bytes per (step, layer, token); a 50-step run of a
# 19-layer model with 4096 image tokens needs about 60 MiB.
_DRAW_CACHE_BYTES = 128 << 20


def mix(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (Python's hash() is salted for str)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (int(p) & _MASK64)) * 0x100000001B3 + 0x632BE59BD9B4E019) & _MASK64
    return h


class FreshTokens:
    """Fresh-token picks of a transformer; the draws are kept across runs (they depend on
    the seed, the steps and the shapes only, never on the features)."""

    def __init__(self, group_sizes: dict[str, int]) -> None:
        self.group_sizes = group_sizes  # feed-forward modules per token group
        self._gen = torch.Generator(device="cpu")
        self._draws: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._draws_bytes = 0
        self._offsets: dict[tuple, torch.Tensor] = {}

    def rows(self, branch: BranchState, cfg: ClusCaConfig, total_steps: int | None, group: str,
             clusters: GroupClusters) -> tuple[torch.Tensor, ...]:
        """Rows (in the flattened ``(batch * tokens)`` layout) recomputed this step by each
        feed-forward module of ``group``: one ``(batch * k * f,)`` tensor per layer, cluster-major.

        The picks of all layers and of every cached step up to the next full step are made
        at once, on the first cached call after a clustering: per step that leaves a lookup.
        """
        return self._lookup(branch, cfg, total_steps, group, clusters)[0]

    def table(self, branch: BranchState, cfg: ClusCaConfig, total_steps: int | None, group: str,
              clusters: GroupClusters) -> torch.Tensor:
        """The same rows as one ``(layers, batch * k * f)`` tensor (what a captured step copies in)."""
        return self._lookup(branch, cfg, total_steps, group, clusters)[1]

    def _lookup(self, branch: BranchState, cfg: ClusCaConfig, total_steps: int | None, group: str,
                clusters: GroupClusters) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        step = branch.step
        cached = branch.fresh.get(group)
        if cached is not None and cached[0] == step and cached[1] is clusters:
            return cached[2]
        ahead = branch.fresh_ahead.get(group)
        if ahead is None or ahead[0] is not clusters or step not in ahead[1]:
            steps = _cached_run(cfg, total_steps, step)
            ahead = (clusters, self._pick(cfg.seed, group, clusters, steps, cfg.fresh_tokens))
            branch.fresh_ahead[group] = ahead
        picked = ahead[1][step]
        branch.fresh[group] = (step, clusters, picked)
        return picked

    def _pick(self, seed: int, group: str, clusters: GroupClusters, steps: tuple[int, ...], f: int) -> dict[int, tuple]:
        """Fresh rows of every layer of ``group`` for each of ``steps``:
        ``{step: (layers x (b * k * f,), the (layers, b * k * f) table they view)}``."""
        assign = clusters.assign
        b, n = assign.shape
        k = clusters.k
        layers = self.group_sizes[group]
        dev = assign.device
        order, rank = self._draw(seed, steps, group, layers, n, dev)  # (steps * layers, n)
        m = order.shape[0]
        offsets = self._row_offsets(b, n, dev)  # (1, b, 1): first row of each sample
        rank = rank.unsqueeze(1).expand(m, b, n)
        assign_l = assign.unsqueeze(0).expand(m, b, n)
        best = torch.full((m, b, k), -1, dtype=rank.dtype, device=dev)
        best.scatter_reduce_(2, assign_l, rank, reduce="amax", include_self=True)
        if f == 1:
            # An empty cluster (-1) gets an arbitrary token: its exact output is still valid.
            tokens = order.gather(1, best.clamp_min_(0).view(m, b * k)).view(m, b, k)
        else:
            picks = [best]
            for _ in range(f - 1):
                rank = rank.masked_fill(rank.eq(best.gather(2, assign_l)), -1)
                best = torch.full((m, b, k), -1, dtype=rank.dtype, device=dev)
                best.scatter_reduce_(2, assign_l, rank, reduce="amax", include_self=True)
                picks.append(best)
            stacked = torch.stack(picks, dim=3)  # (m, b, k, f)
            # A cluster with fewer than f members repeats its first pick.
            stacked = torch.where(stacked < 0, stacked[..., :1], stacked)
            tokens = order.gather(1, stacked.clamp_min(0).reshape(m, -1)).reshape(m, b, k * f)
        rows = tokens.add_(offsets).view(len(steps), layers, -1)
        # Per step, one row tensor per layer (views made here, not on the hot path).
        return {s: (tuple(rows[i].unbind(0)), rows[i]) for i, s in enumerate(steps)}

    def _draw(self, seed: int, steps: tuple[int, ...], group: str, layers: int, n: int, dev: torch.device):
        """Token order by random score, and each token's rank in it: ``(steps * layers, n)`` each.

        Kept across runs: a service repeats the same steps for every request, and on an
        accelerator this also saves a host-to-device copy per cached step.
        """
        key = (seed, steps, group, layers, n, dev)
        hit = self._draws.get(key)
        if hit is not None:
            return hit
        orders = []
        for step in steps:
            self._gen.manual_seed(mix(seed, step, len(group), ord(group[0])))
            orders.append(torch.rand(layers, n, generator=self._gen).argsort(dim=1))  # tokens by score
        order = torch.cat(orders) if len(orders) > 1 else orders[0]
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n).expand(order.shape[0], n))
        drawn = (order.to(dev), rank.to(dev))
        size = 2 * order.numel() * order.element_size()
        while self._draws and self._draws_bytes + size > _DRAW_CACHE_BYTES:
            old = self._draws.pop(next(iter(self._draws)))
            self._draws_bytes -= 2 * old[0].numel() * old[0].element_size()
        if size <= _DRAW_CACHE_BYTES:
            self._draws[key] = drawn
            self._draws_bytes += size
        return drawn

    def _row_offsets(self, b: int, n: int, dev: torch.device) -> torch.Tensor:
        key = (b, n, dev)
        off = self._offsets.get(key)
        if off is None:
            if len(self._offsets) >= _OFFSETS_KEPT:
                self._offsets.pop(next(iter(self._offsets)))
            off = self._offsets[key] = (torch.arange(b, device=dev) * n).view(1, b, 1)
        return off


def _cached_run(cfg: ClusCaConfig, total: int | None, step: int) -> tuple[int, ...]:
    """``step`` and the cached steps that follow it, up to the next full step."""
    steps = [step]
    s = step + 1
    while len(steps) < cfg.interval and not cfg.is_full_step(s) and (total is None or s < total):
        steps.append(s)
        s += 1
    return tuple(steps)


def write_fresh(factors, fresh: torch.Tensor, rows: torch.Tensor, flat_index: torch.Tensor | None, gamma,
                per_cluster: int, anchored: bool, coeffs, errors: list | None = None) -> None:
    """Fold the exact outputs ``fresh`` (``(b * k * f, dout)``, cluster-major, of ``rows``)
    into ``F_0`` of ``factors``: blend each cluster's mean into its members with weight
    ``gamma`` (a number or a 0-d tensor; ``None``: no propagation), then write each fresh
    output into its own token's slot.

    ``anchored`` (``propagation="anchored"``) stores the fresh value net of the higher-order
    terms, so the Taylor sum returns it exactly at its token. ``errors``, when given, gets the
    fresh outputs and what the prediction said for their tokens, for the divergence guard to
    measure once per step over every module (``clusca.guard.measured``).
    """
    f0 = factors.rows[0]
    dout = f0.shape[-1]
    if fresh.dtype != f0.dtype:
        fresh = fresh.to(f0.dtype)
    if fresh.ndim != 2:
        fresh = fresh.reshape(-1, dout)
    if errors is not None:
        pred = f0.index_select(0, rows)
        for k in range(1, factors.n):
            add_scaled(pred, factors.rows[k].index_select(0, rows), coeffs[k])
        errors.append((pred, fresh, factors.shape[0]))
    if gamma is not None:
        mean = fresh if per_cluster == 1 else fresh.view(-1, per_cluster, dout).mean(1)
        # F0 <- (1 - gamma) F0 + gamma * fresh(cluster of token). A row gather plus an in-place
        # lerp is about twice as fast on CPU as the equivalent one-hot bmm.
        f0.lerp_(mean.index_select(0, flat_index), gamma)
    n = factors.n
    if anchored and n > 1:
        fresh = fresh.clone()
        for k in range(1, n):
            add_scaled(fresh, factors.rows[k].index_select(0, rows), -coeffs[k])
    f0.index_copy_(0, rows, fresh)
