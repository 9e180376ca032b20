"""Runner for diffusers pipelines whose output is frames (WanPipeline, HunyuanVideoPipeline, ...).

The call is the image call (docs/architecture.md) with ``num_frames``, one video per prompt
(``num_videos_per_prompt``) and frames as arrays; each output is one video, a
``(frames, height, width, 3)`` array the worker encodes in the request's format. ClusCa
runs on the video transformer as on an image one: its tokens are each sample's
spatio-temporal patches, clustered per sample.
"""

from __future__ import annotations

from typing import Any

from service.worker.runners.base import Batch, StepCallback
from service.worker.runners.diffusers import DiffusersRunner


class VideoDiffusersRunner(DiffusersRunner):
    """A diffusers video pipeline from ``path`` (``pipeline_class``: a video class, or ``auto``)."""

    def call_kwargs(self, batch: Batch, on_step: StepCallback, stop: list[bool]) -> dict[str, Any]:
        kwargs = super().call_kwargs(batch, on_step, stop)
        kwargs.pop("num_images_per_prompt", None)
        kwargs.update(num_frames=batch.num_frames or self.entry.defaults.num_frames, num_videos_per_prompt=1,
                      output_type="np")
        return self._accepted(kwargs)

    def _accepted(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        params = self.params
        if not params or "*" in params:
            return kwargs
        return {k: v for k, v in kwargs.items() if k in params}

    def outputs(self, result: Any) -> list[Any]:
        return list(result.frames)

    def warm_up_kwargs(self) -> dict[str, Any]:
        kwargs = super().warm_up_kwargs()
        kwargs.pop("num_images_per_prompt", None)
        # The smallest video the model makes: the warm-up pays one-off costs, not the full call.
        kwargs.update(num_frames=1 + self.entry.limits.frame_step, num_videos_per_prompt=1, output_type="np")
        return self._accepted(kwargs)
