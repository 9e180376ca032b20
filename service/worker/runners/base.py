"""The one seam between the worker and a model: load it, run a batch, get images and statistics.

The worker groups compatible jobs (equal :meth:`JobRequest.batch_key`) into a
:class:`Batch` and hands it to its model's :class:`Runner` with a step callback. How a
model is loaded, which arguments its pipeline takes, how it reports steps and how it is
stopped are the runner's business; the worker knows none of it, and names no model kind.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from service.contract import JobRequest
from service.registry import ModelEntry

# Called after every denoising step with the number of steps done; returning True asks the
# runner to stop the batch (every job in it was cancelled).
StepCallback = Callable[[int], bool]


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
    cache: dict[str, Any] = field(default_factory=dict)
    # Frames per video (video models; None: still images).
    num_frames: int | None = None

    @classmethod
    def of(cls, requests: Sequence[JobRequest]) -> "Batch":
        """The call for ``requests`` (equal batch keys): the call-wide settings from the first."""
        first = requests[0]
        prompts = [r.prompt for r in requests for _ in range(r.num_images)]
        negatives = None if first.negative_prompt is None else \
            [r.negative_prompt or "" for r in requests for _ in range(r.num_images)]
        return cls(prompts=prompts, negative_prompts=negatives, seeds=[s for r in requests for s in r.seeds],
                   width=first.width, height=first.height, steps=first.steps, guidance=first.guidance,
                   cache=first.cache, num_frames=first.num_frames)

    @property
    def images(self) -> int:
        return len(self.prompts)


@dataclass
class BatchOutput:
    """One image (or video) per prompt, in order, and the run's statistics; ``stopped``: ended by the callback."""

    images: list[Any]
    stats: dict[str, Any]
    stopped: bool = False


def uncached_stats(cache: dict[str, Any], steps: int) -> dict[str, Any]:
    """Statistics shaped like ClusCa's for a run without a transformer: every step full, nothing cached."""
    return {"mode": cache.get("mode", "off"), "full_steps": steps, "cached_steps": 0, "token_fraction": 1.0,
            "flops": 0, "flops_uncached": 0, "flops_speedup": 1.0, "cache_bytes": 0, "kmeans_ms": 0.0,
            "guard_trips": 0}


class Runner(ABC):
    """A loaded model, warm and ready to run batches."""

    def __init__(self, entry: ModelEntry, device: str):
        self.entry = entry
        self.device = device

    @classmethod
    @abstractmethod
    def load(cls, entry: ModelEntry, device: str, torch_threads: int = 0) -> "Runner":
        """Load ``entry`` on ``device`` (``auto``: the best available); ``torch_threads`` > 0 sets
        torch's thread count for runners that use torch."""

    @abstractmethod
    def run(self, batch: Batch, on_step: StepCallback) -> BatchOutput:
        """Run ``batch`` as one call. Raises :class:`RequestNotSupported` before running, or
        whatever the model raised (the runner has already freed what it could)."""

    def warm_up(self) -> None:
        """Pay one-off first-call costs now rather than in the first client's latency."""

    def describe(self) -> dict[str, Any]:
        """What a worker's heartbeat says about this model."""
        return {"device": self.device, "kind": self.entry.kind}
