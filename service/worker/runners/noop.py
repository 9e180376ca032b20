"""The no-op model's runner: the service path (queue, batching, transport) with nothing to compute.

Its pipelines (:mod:`service.worker.runners.noop_pipeline`) follow the diffusers calling conventions, the older
callback one included, so the service's handling of them is tested without torch.
"""

from __future__ import annotations

from typing import Any

from service.worker.runners.noop_pipeline import LegacyCallbackNoopPipeline, NoopPipeline, SeedGenerator
from service.registry import ModelEntry
from service.worker.runners.base import Batch, uncached_stats
from service.worker.runners.pipeline import PipelineRunner


class NoopRunner(PipelineRunner):
    @classmethod
    def load(cls, entry: ModelEntry, device: str, torch_threads: int = 0) -> "NoopRunner":
        delay = float(entry.options.get("step_delay_s", 0.0))
        if entry.options.get("legacy_callback"):
            pipe: Any = LegacyCallbackNoopPipeline(delay)
        else:
            pipe = NoopPipeline(step_delay_s=delay, fail_on=entry.options.get("fail_on"))
        return cls(entry, "cpu", pipe)

    def generator(self, seed: int) -> SeedGenerator:
        return SeedGenerator(seed)

    def execute(self, kwargs: dict[str, Any], batch: Batch) -> tuple[list[Any], dict[str, Any]]:
        if batch.num_frames is not None:  # an entry with `output: video`: one video per prompt
            out = self.pipe(**kwargs, num_frames=batch.num_frames)
            return list(out.frames), uncached_stats(batch.cache, batch.steps)
        return list(self.pipe(**kwargs).images), uncached_stats(batch.cache, batch.steps)
