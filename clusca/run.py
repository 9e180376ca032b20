"""``clusca_run``: choose settings for one generation and collect its statistics."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Iterator

import torch

from .config import ClusCaConfig
from .install import apply_clusca, get_controller
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
        guard_trips: calls due to be cached that the divergence guard computed in full instead
            (``guard``, see ``clusca.guard``); they count among ``full_steps``.
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


class ClusCaRun:
    """Handle of an active (or finished) run; ``stats`` is live while the run is active."""

    def __init__(self, model: torch.nn.Module, config: ClusCaConfig, num_inference_steps: int | None) -> None:
        self.model = model
        self.config = config
        self.num_inference_steps = num_inference_steps
        self._final: RunStats | None = None

    @property
    def stats(self) -> RunStats:
        if self._final is not None:
            return self._final
        ctrl = get_controller(self.model)
        return RunStats.from_counters(self.config.mode, ctrl.counters, self.config.capture)

    def set_step(self, step: int) -> None:
        """Say which denoising step (0-based) the next transformer calls belong to.

        Optional: without it the step is read from the ``timestep`` argument, one host read
        per call (a synchronisation on an accelerator). Call it before each step, e.g. with
        ``step + 1`` from a pipeline's ``callback_on_step_end``; a smaller index than the last
        one starts a new denoising loop.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step: must be a non-negative integer, got {step!r}")
        ctrl = get_controller(self.model)
        if self._final is None and ctrl is not None and ctrl.active:
            ctrl.announce_step(step)

    def _finish(self, counters: Counters) -> None:
        self._final = RunStats.from_counters(self.config.mode, counters, self.config.capture)


@contextlib.contextmanager
def clusca_run(
    model: torch.nn.Module,
    config: ClusCaConfig | str | None = None,
    *,
    num_inference_steps: int | None = None,
) -> Iterator[ClusCaRun]:
    """Activate ClusCa on ``model`` for the duration of the block.

    ``config`` is a ``ClusCaConfig``, a preset name, or ``None`` for the settings given to
    ``apply_clusca``. All cache state is cleared on entry and on exit, so consecutive runs
    never share state. Hooks are installed on first use if ``apply_clusca`` was not called.
    """
    ctrl = get_controller(model)
    if isinstance(config, str):
        config = ClusCaConfig.preset(config)
    if ctrl is None:
        ctrl = apply_clusca(model, config)
    if config is None:
        config = ctrl.default_config
    config.validate()
    if num_inference_steps is not None and (not isinstance(num_inference_steps, int) or num_inference_steps < 1):
        raise ValueError(f"num_inference_steps: must be a positive integer, got {num_inference_steps!r}")
    if config.modules is not None and ctrl.base_arch.with_overrides(config.modules) != ctrl.arch:
        # Different module patterns need different hooks: re-install them.
        ctrl = apply_clusca(model, config, architecture=ctrl.base_arch)
    if ctrl.active:
        raise RuntimeError("clusca_run: a run is already active on this model (runs cannot be nested)")
    run = ClusCaRun(model, config, num_inference_steps)
    ctrl.start(config, num_inference_steps)
    try:
        yield run
    finally:
        run._finish(ctrl.counters)
        ctrl.stop()
