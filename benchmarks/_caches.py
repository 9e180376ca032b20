"""The caches the benchmarks compare, behind one interface.

A :class:`Method` is either the uncached model, one of our ClusCa modes (a
``ClusCaConfig``) or one of diffusers' built-in caches (a factory of its config).
:func:`activate` turns a method on for exactly one generation and hands back a
:class:`Probe` that collects what the run cost: analytic FLOPs for our modes, cache
bytes for every method. Measured FLOPs (the same yardstick for all methods) come from
:func:`count_flops`, which wraps torch's FLOP counter.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from clusca import ClusCaConfig, apply_clusca, clusca_run, compile_clusca, uncompile_clusca
from clusca.run import RunStats


@dataclass
class Env:
    """What a diffusers cache config may need to know about the run it serves."""

    steps: int
    timestep: float = 0.0  # current timestep on the 0..1000 scale, set by a forward pre-hook
    mag_ratios: list[float] | None = None


@dataclass(frozen=True)
class Method:
    """One cache setting of the comparison.

    ``family`` groups settings into one curve of the plot; ``clusca`` (our library) and
    ``diffusers`` (a function of :class:`Env` returning a diffusers cache config) are
    mutually exclusive; neither means the uncached model. For ours, ``lean=False`` keeps
    cached steps on the module hooks and ``compiled`` runs under ``compile_clusca``.
    """

    name: str
    family: str
    clusca: ClusCaConfig | None = None
    diffusers: Callable[[Env], Any] | None = None
    note: str = ""
    lean: bool = True
    compiled: bool = False

    @property
    def uncached(self) -> bool:
        return self.clusca is None and self.diffusers is None


@dataclass
class Probe:
    """Costs of one run, filled in while it runs and when it ends."""

    stats: RunStats | None = None
    cache_bytes: int = 0
    run: Any = None  # our ClusCaRun while one is active (to announce steps)
    _model: torch.nn.Module | None = field(default=None, repr=False)

    def sample_memory(self) -> None:
        """Record the bytes held by diffusers cache states now (keeps the peak).

        diffusers pipelines reset their cache states when they finish, so this must be
        called during the run (e.g. from a step callback), not after it.
        """
        if self._model is not None:
            self.cache_bytes = max(self.cache_bytes, diffusers_cache_bytes(self._model))


def diffusers_cache_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors held in the states of diffusers' stateful hooks under ``model``.

    Each storage is counted once, however many states share it. Our own ClusCa hooks
    are skipped: their memory is reported by their run statistics.
    """
    from diffusers.hooks.hooks import StateManager

    from clusca.state import BranchState

    seen: set[int] = set()
    total = 0

    def walk(obj: Any, depth: int) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            key = st.data_ptr()
            if key not in seen and st.nbytes() > 0:
                seen.add(key)
                total += st.nbytes()
        elif depth < 4 and isinstance(obj, dict):
            for v in obj.values():
                walk(v, depth + 1)
        elif depth < 4 and isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, depth + 1)

    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for hook in registry.hooks.values():
            for attr in vars(hook).values():
                if isinstance(attr, StateManager):
                    states = list(attr._state_cache.values())
                elif type(attr).__name__.endswith("State") and hasattr(attr, "__dict__"):
                    states = [attr]  # hooks that keep one state object of their own (e.g. PAB)
                else:
                    continue
                for state in states:
                    if not isinstance(state, BranchState):
                        walk(vars(state), 0)
    return total


@contextlib.contextmanager
def activate(method: Method, model: torch.nn.Module, env: Env) -> Iterator[Probe]:
    """Run the block with ``method`` on ``model`` (one generation of ``env.steps`` steps)."""
    probe = Probe()
    if method.clusca is not None:
        apply_clusca(model, lean=method.lean)
        if method.compiled:
            compile_clusca(model)
        # A pipeline resets every stateful hook when it returns; the run's statistics
        # survive that (the cache is cleared, the counters kept).
        try:
            with clusca_run(model, method.clusca, num_inference_steps=env.steps) as run:
                probe.run = run
                yield probe
        finally:
            probe.run = None
            if method.compiled:
                uncompile_clusca(model)
        probe.stats = run.stats
        probe.cache_bytes = probe.stats.cache_bytes
    elif method.diffusers is not None:
        model.enable_cache(method.diffusers(env))
        probe._model = model
        try:
            with model.cache_context("cond"):
                yield probe
                probe.sample_memory()
        finally:
            model.disable_cache()
    else:
        yield probe


def track_timestep(model: torch.nn.Module, env: Env) -> torch.utils.hooks.RemovableHandle:
    """Keep ``env.timestep`` equal to the timestep (0..1000 scale) of the current call.

    Pyramid Attention Broadcast asks a callback for it; FLUX-style models receive the
    timestep divided by 1000.
    """

    def hook(_module, args, kwargs):
        t = kwargs.get("timestep")
        if isinstance(t, torch.Tensor) and t.numel():
            env.timestep = float(t.reshape(-1)[0]) * 1000.0

    return model.register_forward_pre_hook(hook, with_kwargs=True)


# ---------------------------------------------------------------- FLOPs
def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


@contextlib.contextmanager
def count_flops(model: torch.nn.Module) -> Iterator[list[int]]:
    """Measure the matrix-multiply and attention FLOPs executed inside ``model``.

    Yields a one-element list that holds the total once the block ends. torch's counter
    has no formula for the CPU flash-attention kernel, so one is added for it.
    """
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops}
    result = [0]
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        yield result
    counts = counter.get_flop_counts().get(type(model).__name__, {})
    result[0] = int(sum(counts.values()))


# ---------------------------------------------------------------- MagCache calibration
def calibrate_mag_ratios(model: torch.nn.Module, steps: int, generate: Callable[[], None]) -> list[float]:
    """Run ``generate`` once with MagCache in calibration mode and return its ratios.

    MagCache needs per-model magnitude ratios; diffusers prints them at the end of a
    calibration run, which is the only place they are exposed.
    """
    import ast

    from diffusers import MagCacheConfig

    model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    buf = io.StringIO()
    try:
        with model.cache_context("cond"), contextlib.redirect_stdout(buf):
            generate()
    finally:
        model.disable_cache()
    for line in buf.getvalue().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            ratios = [float(x) for x in ast.literal_eval(line)]
            if len(ratios) == steps:
                return ratios
    raise RuntimeError("MagCache calibration printed no ratios; the diffusers version may differ")
