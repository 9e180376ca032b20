"""``RunStats``: what one ClusCa run computed and saved.

Torch-free, like :mod:`clusca.config`: the HTTP API process reads a job's statistics
with it, and the service's job contract stores them as its JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # pragma: no cover - the counters live with the hooks, which need torch
    from .state import Counters


@dataclass(frozen=True)
class RunStats:
    """Statistics of one run.

    Attributes:
        mode: the run's cache mode.
        calls: transformer forward calls (two per step when guidance uses separate calls).
        full_steps / cached_steps: denoising steps computed in full / predicted.
        tokens_computed / tokens_uncached: token-module evaluations summed over the hooked
            modules, with the cache and as the uncached model would do them.
        token_fraction: ``tokens_computed / tokens_uncached``.
        flops / flops_uncached: analytic FLOPs of the run and of the same run uncached
            (linear and convolution layers: 2 x in x out per token; attention: the score
            and value products), over the whole transformer.
        flops_speedup: ``flops_uncached / flops``.
        cache_bytes: peak bytes held by cache tensors (Taylor factors, clusters).
        kmeans_ms: total time spent in k-means; kmeans_calls: how many clusterings;
            kmeans_rounds: update rounds they ran in total.
        graph_captures / graph_replays: cached steps recorded as a CUDA graph / replayed
            from one (``capture="auto"``, see ``clusca.capture``).
        guard_trips: calls due to be cached at which the divergence guard computed one or more
            samples in full (``guard``, see ``clusca.guard``); they count among ``full_steps``.
        capture: what became of capture: ``off`` (the setting), ``replayed``, ``unused`` (no
            lean cached step ran), ``unavailable: <why>`` (e.g. not a CUDA device), or
            ``eager: <why>`` (recording failed or disagreed with the eager step; with
            ``replayed; eager for some: <why>`` when other kinds of steps did replay).
    """

    mode: str
    calls: int
    full_steps: int
    cached_steps: int
    tokens_computed: int
    tokens_uncached: int
    token_fraction: float
    flops: int
    flops_uncached: int
    flops_speedup: float
    cache_bytes: int
    kmeans_ms: float
    kmeans_calls: int
    kmeans_rounds: int
    graph_captures: int = 0
    graph_replays: int = 0
    capture: str = "unused"
    guard_trips: int = 0

    @classmethod
    def from_counters(cls, mode: str, c: Counters, capture: str = "auto") -> "RunStats":
        full = c.full_steps
        return cls(
            mode=mode,
            calls=c.calls,
            full_steps=len(full),
            cached_steps=len(c.cached_steps - full),
            tokens_computed=c.tokens_computed,
            tokens_uncached=c.tokens_uncached,
            token_fraction=(c.tokens_computed / c.tokens_uncached) if c.tokens_uncached else 1.0,
            flops=c.flops,
            flops_uncached=c.flops_uncached,
            flops_speedup=(c.flops_uncached / c.flops) if c.flops else 1.0,
            cache_bytes=c.cache_bytes_peak,
            kmeans_ms=c.kmeans_s * 1000.0,
            kmeans_calls=c.kmeans_calls,
            kmeans_rounds=c.kmeans_rounds,
            graph_captures=c.graph_captures,
            graph_replays=c.graph_replays,
            capture=_capture_summary(capture, c),
            guard_trips=c.guard_trips,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def uncached(cls, mode: str, steps: int) -> "RunStats":
        """The statistics of a run without a transformer to cache: every step full, nothing saved."""
        return cls(mode=mode, calls=steps, full_steps=steps, cached_steps=0, tokens_computed=0, tokens_uncached=0,
                   token_fraction=1.0, flops=0, flops_uncached=0, flops_speedup=1.0, cache_bytes=0, kmeans_ms=0.0,
                   kmeans_calls=0, kmeans_rounds=0, capture="unused")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunStats":
        """The statistics :meth:`to_dict` wrote; ``ValueError`` (or ``TypeError``) when ``d`` is not that.

        Fields added since a result was stored take their defaults; unknown fields are refused."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown statistic {unknown[0]!r}")
        values: dict[str, Any] = {}
        for name, value in d.items():
            kind = known[name].type
            want = {"int": int, "float": (int, float), "str": str}.get(str(kind), object)
            if isinstance(value, bool) or not isinstance(value, want):
                raise ValueError(f"statistic {name!r}: expected {kind}")
            values[name] = float(value) if kind == "float" else value
        return cls(**values)


def _capture_summary(setting: str, c: Counters) -> str:
    if setting == "off":
        return "off"
    why = "; ".join(c.capture_failures)
    if c.graph_replays or c.graph_captures:
        return f"replayed; eager for some: {why}" if why else "replayed"
    if why:
        return f"eager: {why}"
    if c.capture_unavailable:
        return f"unavailable: {c.capture_unavailable}"
    return "unused"
