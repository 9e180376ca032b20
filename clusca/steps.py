"""Which denoising step and which branch (``cond``, ``uncond``, ...) a transformer call is.

A pipeline that names its branches (``cache_context``) and its steps is read directly, and
so is a step the caller announces (``ClusCaRun.set_step``, e.g. from the pipeline's step
callback). Otherwise a new timestep value starts a new step, a repeated one is a further
branch of it (guidance as two plain calls), and a timestep that goes up again starts a new
loop. Reading the timestep is one host read per call, a synchronisation on an accelerator,
which an announced step avoids.
"""

from __future__ import annotations

from typing import Callable

import torch

from .calls import arg_position, get_arg
from .diffusers_compat import CacheContext, StateManager, current_context
from .state import BranchState


def _first_value(v):
    while isinstance(v, list):
        v = v[0]
    return v


class StepTracker:
    def __init__(self, model: torch.nn.Module) -> None:
        self.timestep_pos = arg_position(model.forward, "timestep")
        # Branch contexts by name: frozen, so one object per name serves every call.
        self._contexts: dict[str, CacheContext] = {}
        self.reset()

    def reset(self) -> None:
        """A new denoising loop (an announced step is forgotten too: announce each loop)."""
        self._last_t: float | None = None
        self._step = -1
        self._seen: dict[str, int] = {}
        self.announced: int | None = None  # the step the caller said comes next

    def announce(self, step: int, new_loop: Callable[[], None]) -> None:
        """The caller says which step the next calls belong to (``ClusCaRun.set_step``)."""
        if self.announced is not None and step < self.announced:
            new_loop()  # a step index that goes back: a new denoising loop
        self.announced = step

    def locate(self, sm: StateManager, args: tuple, kwargs: dict, new_loop: Callable[[], None]) -> tuple[BranchState, int | None]:
        """This call's branch state and step (``None`` when nothing tells the step)."""
        ctx = current_context(sm)
        step = None
        if ctx is not None and ctx.step_index is not None:
            step = int(ctx.step_index)
        elif self.announced is not None:
            step = self.announced
        if step is not None:
            if step != self._step:
                self._step, self._seen = step, {}
        else:
            tv = self._timestep(args, kwargs)
            if tv is not None:
                if self._last_t is not None and tv > self._last_t:
                    # Timesteps only decrease within a denoising loop: this is a new one.
                    new_loop()
                if tv != self._last_t:
                    self._step += 1
                    self._seen = {}
                    self._last_t = tv
                step = self._step
        # Branch key: the cache context's name ("cond", "uncond", ...) or "call"; a name
        # seen again within the same step (guidance as two plain calls) is a new branch.
        name = ctx.name if ctx is not None else "call"
        key = name
        if step is not None:
            repeat = self._seen.get(name, 0)
            self._seen[name] = repeat + 1
            if repeat:
                key = f"{name}#{repeat}"
        if ctx is None or ctx.name != key:
            context = self._contexts.get(key)
            if context is None:
                context = self._contexts[key] = CacheContext(key)
            sm.set_context(context)
            branch = sm.get_state()
            sm.set_context(ctx)
        else:
            branch = sm.get_state()
        branch.name = key
        return branch, step

    def _timestep(self, args: tuple, kwargs: dict) -> float | None:
        t = get_arg(args, kwargs, "timestep", self.timestep_pos)
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            # One host read per transformer call (not per module). tolist() is one dispatch
            # where indexing then reading is three, which shows on small models.
            return float(_first_value(t.tolist()) if t.numel() <= 64 else t.reshape(-1)[0])
        if isinstance(t, (int, float)):
            return float(t)
        return None
