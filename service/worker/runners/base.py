"""The one seam between the worker and a model: load it, run a batch, get images and statistics.

The worker groups compatible jobs (equal :meth:`JobRequest.batch_key`) into a
:class:`Batch` and hands it to its model's :class:`Runner` with a step callback. How a
model is loaded, which arguments its pipeline takes, how it reports steps and how it is
stopped are the runner's business; the worker knows none of it, and names no model kind.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from clusca.config import ClusCaConfig
from clusca.stats import RunStats

from service.contract import AdapterUse, JobRequest, denoised_steps
from service.registry import ModelEntry
from service.worker.adapters import AdapterSlots, AdapterSource

# Called after every denoising step with the number of steps done; returning True asks the
# runner to stop the batch (every job in it was cancelled).
StepCallback = Callable[[int], bool]


class CallStopped(Exception):
    """Raised inside a running call to stop it: every job in it was cancelled or is past its deadline."""


class RequestNotSupported(Exception):
    """The batch asks for something this model cannot do (e.g. a negative prompt); nothing ran."""


@dataclass(frozen=True)
class Batch:
    """Compatible requests as one pipeline call: one prompt, negative prompt and seed per image."""

    prompts: list[str]
    negative_prompts: list[str] | None
    seeds: list[int]
    width: int
    height: int
    steps: int
    guidance: float
    cache: ClusCaConfig = field(default_factory=ClusCaConfig)
    # Frames per video (video models; None: still images).
    num_frames: int | None = None
    # Edits: one input image (PIL, RGB) per image of the call and the call-wide strength; for
    # inpainting one mask (PIL, L; white = repaint) per image too.
    images_in: list[Any] | None = None
    strength: float | None = None
    masks: list[Any] | None = None
    # Each image's LoRA adapters (``()``: the base model); None when no image of the call has any.
    adapters: list[tuple[AdapterUse, ...]] | None = None

    @classmethod
    def of(cls, requests: Sequence[JobRequest], inputs: Sequence[tuple[Any, Any]] | None = None) -> "Batch":
        """The call for ``requests`` (equal batch keys): the call-wide settings from the first.
        ``inputs``: each edit request's ``(image, mask or None)``, in request order."""
        first = requests[0]
        prompts = [r.prompt for r in requests for _ in range(r.num_images)]
        negatives = None if first.negative_prompt is None else \
            [r.negative_prompt or "" for r in requests for _ in range(r.num_images)]
        images = masks = None
        if first.is_edit:
            if inputs is None or len(inputs) != len(requests):
                raise ValueError("an edit batch needs the input image of every request")
            images = [im for r, (im, _) in zip(requests, inputs) for _ in range(r.num_images)]
            if first.mask is not None:
                masks = [m for r, (_, m) in zip(requests, inputs) for _ in range(r.num_images)]
        adapters = [r.adapters for r in requests for _ in range(r.num_images)]
        return cls(prompts=prompts, negative_prompts=negatives, seeds=[s for r in requests for s in r.seeds],
                   width=first.width, height=first.height, steps=first.steps, guidance=first.guidance,
                   cache=first.cache, num_frames=first.num_frames, images_in=images, strength=first.strength,
                   masks=masks, adapters=adapters if any(adapters) else None)

    @property
    def denoised_steps(self) -> int:
        """Steps the pipeline runs (an edit runs the last ``strength`` share of the schedule)."""
        return self.steps if self.strength is None else denoised_steps(self.steps, self.strength)

    @property
    def skipped_steps(self) -> int:
        return self.steps - self.denoised_steps

    @property
    def images(self) -> int:
        return len(self.prompts)


@dataclass
class BatchOutput:
    """One image (or video) per prompt, in order, and the run's statistics (None when ``stopped``:
    ended by the callback)."""

    images: list[Any]
    stats: RunStats | None
    stopped: bool = False
    # Seconds spent loading the call's adapters into their slots before it ran.
    adapter_load_s: float = 0.0


class Runner(ABC):
    """A loaded model, warm and ready to run batches."""

    def __init__(self, entry: ModelEntry, device: str):
        self.entry = entry
        self.device = device
        # The model's loaded adapters (service/worker/adapters.py); None: it serves none.
        self.adapters: AdapterSlots | None = None

    def attach_adapters(self, source: AdapterSource) -> None:
        """Serve adapters from ``source``; a runner whose model has layers to adapt gives the slots a
        bank over them (the base runner keeps the slots' bookkeeping only)."""
        if self.entry.serves_adapters:
            self.adapters = AdapterSlots(self.entry, source)

    @classmethod
    @abstractmethod
    def load(cls, entry: ModelEntry, device: str, torch_threads: int = 0) -> "Runner":
        """Load ``entry`` on ``device`` (``auto``: the best available); ``torch_threads`` > 0 sets
        torch's thread count for runners that use torch."""

    @abstractmethod
    def run(self, batch: Batch, on_step: StepCallback, stop: threading.Event | None = None) -> BatchOutput:
        """Run ``batch`` as one call. Raises :class:`RequestNotSupported` before running, or
        whatever the model raised (the runner has already freed what it could). Once ``stop``
        is set the call ends as soon as it can, within a transformer block where the model
        has blocks, and returns with ``stopped``."""

    def warm_up(self) -> None:
        """Pay one-off first-call costs now rather than in the first client's latency."""

    def describe(self) -> dict[str, Any]:
        """What a worker's heartbeat says about this model."""
        out: dict[str, Any] = {"device": self.device, "kind": self.entry.kind}
        if self.adapters is not None:
            out.update(self.adapters.describe())
        return out
