"""The no-op model's runner: the service path (queue, batching, transport) with nothing to compute.

Its pipelines (:mod:`service.worker.runners.noop_pipeline`) follow the diffusers calling conventions, the older
callback one included, so the service's handling of them is tested without torch.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

from service.worker.runners.noop_pipeline import LegacyCallbackNoopPipeline, NoopPipeline, SeedGenerator
from clusca.stats import RunStats

from service.registry import ModelEntry
from service.worker.runners.base import Batch
from service.worker.runners.interrupt import stop_check
from service.worker.runners.pipeline import PipelineRunner


class NoopRunner(PipelineRunner):
    @classmethod
    def load(cls, entry: ModelEntry, device: str, torch_threads: int = 0) -> "NoopRunner":
        delay = float(entry.options.get("step_delay_s", 0.0))
        if entry.options.get("legacy_callback"):
            pipe: Any = LegacyCallbackNoopPipeline(delay)
        else:
            pipe = NoopPipeline(step_delay_s=delay, fail_on=entry.options.get("fail_on"),
                                blocks=int(entry.options.get("blocks", 10)))
        return cls(entry, "cpu", pipe)

    @contextlib.contextmanager
    def stoppable(self, stop: threading.Event | None) -> Iterator[None]:
        # The no-op pipeline's stand-in for blocks: the slices of its step delay.
        self.pipe.before_block = stop_check(stop)
        try:
            yield
        finally:
            self.pipe.before_block = stop_check(None)

    def generator(self, seed: int) -> SeedGenerator:
        return SeedGenerator(seed)

    def execute(self, kwargs: dict[str, Any], batch: Batch) -> tuple[list[Any], RunStats]:
        if batch.num_frames is not None:  # an entry with `output: video`: one video per prompt
            out = self.pipe(**kwargs, num_frames=batch.num_frames)
            return list(out.frames), RunStats.uncached(batch.cache.mode, batch.steps)
        return list(self.pipe(**kwargs).images), RunStats.uncached(batch.cache.mode, batch.steps)
