"""Runners for pipelines called the diffusers way, and the calling conventions they differ in.

Every pipeline the service drives takes the same call (docs/architecture.md): prompts,
one generator per image, size, steps, guidance, and a step callback. Pipelines differ
in two ways that are handled here, once:

* Step callbacks. Current pipelines take ``callback_on_step_end(pipe, i, t, kwargs)`` and
  stop when it sets ``pipe._interrupt``; older ones (e.g. PixArt) take only
  ``callback(i, t, latents)`` with ``callback_steps`` and have no interrupt flag, so they
  are stopped by raising out of the callback.
* Keyword arguments. A pipeline without ``**kwargs`` gets only the arguments it names;
  a dropped ``negative_prompt`` (or an edit's ``image`` or ``mask_image``) would silently change
  the result, so it is refused.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from abc import abstractmethod
from typing import Any

from clusca.stats import RunStats

from service.worker.runners.base import Batch, BatchOutput, CallStopped, RequestNotSupported, Runner, StepCallback
from service.worker.runners.interrupt import stop_between_blocks


def call_parameters(pipe: Any) -> set[str]:
    """Keyword arguments the pipeline's ``__call__`` accepts (``{"*"}``: any)."""
    try:
        params = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {"*"}
    return set(params)


class _Stopped(Exception):
    """Raised out of a legacy step callback to stop a pipeline that has no interrupt flag."""


class PipelineRunner(Runner):
    """A runner around a diffusers-style pipeline object; subclasses load it and execute the call."""

    def __init__(self, entry: Any, device: str, pipe: Any):
        super().__init__(entry, device)
        self.pipe = pipe
        self.params = call_parameters(pipe)

    @abstractmethod
    def generator(self, seed: int) -> Any:
        """The random generator of one image with ``seed``."""

    @abstractmethod
    def execute(self, kwargs: dict[str, Any], batch: Batch) -> tuple[list[Any], RunStats]:
        """Call the pipeline with ``kwargs``; return its images and the run's statistics."""

    def free_memory(self) -> None:
        """After a failed call: give back what the call held (e.g. cached GPU memory)."""

    def extra_kwargs(self) -> dict[str, Any]:
        # Operator-set extras for every call of this model (e.g. FLUX's max_sequence_length).
        return dict(self.entry.options.get("call_kwargs") or {})

    def call_kwargs(self, batch: Batch, on_step: StepCallback, stop: list[bool]) -> dict[str, Any]:
        """The pipeline's keyword arguments for ``batch``, in the convention it follows.

        ``stop`` gets ``[True]`` once the callback asked to stop. An edit's pipeline counts only the
        steps it denoises; progress counts them on the whole schedule, so it still ends at ``steps``.
        """
        skipped = batch.skipped_steps

        def on_step_end(pipe: Any, i: int, _t: Any, kwargs: dict) -> dict:
            if on_step(i + 1 + skipped):
                stop[:] = [True]
                pipe._interrupt = True
            return kwargs

        kwargs: dict[str, Any] = dict(prompt=batch.prompts, num_inference_steps=batch.steps,
                                      guidance_scale=float(batch.guidance),
                                      generator=[self.generator(s) for s in batch.seeds],
                                      height=batch.height, width=batch.width, num_images_per_prompt=1,
                                      callback_on_step_end=on_step_end, output_type="pil")
        if batch.negative_prompts is not None:
            kwargs["negative_prompt"] = batch.negative_prompts
        if batch.images_in is not None:
            kwargs.update(image=batch.images_in, strength=float(batch.strength or 1.0))
        if batch.masks is not None:
            kwargs["mask_image"] = batch.masks
        kwargs.update(self.extra_kwargs())
        params = self.params
        if not params or "*" in params:
            return kwargs
        if "callback_on_step_end" not in params and "callback" in params:
            def legacy(i: int, _t: Any, _latents: Any) -> None:
                if on_step(i + 1 + skipped):
                    stop[:] = [True]
                    raise _Stopped()

            kwargs.pop("callback_on_step_end")
            kwargs.update(callback=legacy, callback_steps=1)
        dropped = [k for k in kwargs if k not in params]
        for name in ("negative_prompt", "image", "mask_image"):
            if name in dropped:
                raise RequestNotSupported(f"model {self.entry.name!r} does not support {name}")
        for k in dropped:
            kwargs.pop(k)
        return kwargs

    def stoppable(self, stop: threading.Event | None) -> contextlib.AbstractContextManager[None]:
        """Where the call checks ``stop`` besides its step callback: between the transformer's blocks."""
        return stop_between_blocks(getattr(self.pipe, "transformer", None), stop)

    def run(self, batch: Batch, on_step: StepCallback, stop: threading.Event | None = None) -> BatchOutput:
        stopped: list[bool] = [False]
        kwargs = self.call_kwargs(batch, on_step, stopped)
        load_s = 0.0
        if batch.adapters is not None:
            if self.adapters is None:
                raise RequestNotSupported(f"model {self.entry.name!r} serves no adapters")
            load_s = self.adapters.select(batch.adapters)
        try:
            with self.stoppable(stop):
                images, stats = self.execute(kwargs, batch)
        except (_Stopped, CallStopped):
            self.free_memory()
            return BatchOutput([], None, stopped=True, adapter_load_s=load_s)
        except Exception:
            self.free_memory()
            raise
        finally:
            if self.adapters is not None:
                self.adapters.release()
        return BatchOutput(images, stats, stopped=stopped[0], adapter_load_s=load_s)
