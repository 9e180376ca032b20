"""A pipeline-shaped stand-in that does no inference.

It follows the worker's pipeline call convention (docs/architecture.md) exactly:
per-step ``callback_on_step_end``, ``pipe._interrupt`` to stop, one generator per
image. Each image is a flat colour derived from its own seed and prompt, so tests can
tell which request and seed an image belongs to; with ``num_frames`` it makes videos the
way diffusers' video pipelines return them (``.frames``, one ``(frames, H, W, 3)`` array
per prompt), each frame a shade of that colour. It imports neither torch nor
diffusers; it exists to measure the service path (queue, batching, transport) alone.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable

from PIL import Image


@dataclass
class SeedGenerator:
    """The part of ``torch.Generator`` the no-op pipeline needs."""

    seed: int

    def initial_seed(self) -> int:
        return self.seed


@dataclass
class NoopOutput:
    images: list[Image.Image]
    frames: list[Any] | None = None


def noop_color(prompt: str, seed: int) -> tuple[int, int, int]:
    """The colour the no-op pipeline paints for ``prompt`` and ``seed``."""
    digest = hashlib.sha256(f"{seed}:{prompt}".encode()).digest()
    return digest[0], digest[1], digest[2]


class NoopPipeline:
    """Returns flat images after ``num_inference_steps`` callback rounds."""

    transformer = None

    def __init__(self, step_delay_s: float = 0.0, fail_on: str | None = None, blocks: int = 10):
        self.step_delay_s = float(step_delay_s)
        # A step's delay is spent in ``blocks`` slices, each preceded by ``before_block()``, as a
        # transformer's blocks are (the runner stops a call there).
        self.blocks = max(1, int(blocks))
        self.before_block: Callable[[], None] = lambda: None
        # A prompt that makes the call raise, to exercise the failure path like a real OOM would.
        self.fail_on = fail_on
        self._interrupt = False
        self.calls = 0

    def to(self, device: Any) -> "NoopPipeline":
        return self

    def __call__(self, prompt: str | list[str], negative_prompt: Any = None, num_inference_steps: int = 4,
                 guidance_scale: float = 0.0, generator: Any = None, height: int = 32, width: int = 32,
                 num_images_per_prompt: int = 1,
                 callback_on_step_end: Callable[..., dict] | None = None,
                 output_type: str = "pil", num_frames: int | None = None, **_: Any) -> NoopOutput:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        gens = generator if isinstance(generator, list) else [generator] * len(prompts)
        if len(gens) != len(prompts):
            raise ValueError(f"got {len(gens)} generators for {len(prompts)} images")
        self._interrupt = False
        self.calls += 1
        if self.fail_on is not None and self.fail_on in prompts:
            raise RuntimeError("simulated failure: out of memory")
        for i in range(num_inference_steps):
            if self._interrupt:
                break
            for _ in range(self.blocks):
                self.before_block()
                if self.step_delay_s:
                    time.sleep(self.step_delay_s / self.blocks)
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, num_inference_steps - i, {})
        colors = [noop_color(p, g.initial_seed() if g is not None else 0) for p, g in zip(prompts, gens)]
        if num_frames is not None:
            import numpy as np

            # Frame k of a video: its colour scaled by (k + 1) / num_frames, so frames differ.
            ramp = (np.arange(1, num_frames + 1, dtype=np.float32) / num_frames)[:, None, None, None]
            frames = [np.broadcast_to(ramp * (np.asarray(c, dtype=np.float32) / 255.0),
                                      (num_frames, height, width, 3)).copy() for c in colors]
            return NoopOutput([], frames)
        return NoopOutput([Image.new("RGB", (width, height), c) for c in colors])


class LegacyCallbackNoopPipeline:
    """The no-op pipeline with the older diffusers callback API (``callback(step, timestep, latents)``,
    ``callback_steps``) and no interrupt flag, as PixArt pipelines have it."""

    transformer = None

    def __init__(self, step_delay_s: float = 0.0):
        self._inner = NoopPipeline(step_delay_s)
        self.before_block: Callable[[], None] = lambda: None

    def to(self, device: Any) -> "LegacyCallbackNoopPipeline":
        return self

    def __call__(self, prompt: str | list[str], negative_prompt: Any = None, num_inference_steps: int = 4,
                 guidance_scale: float = 0.0, generator: Any = None, height: int = 32, width: int = 32,
                 num_images_per_prompt: int = 1, callback: Callable[[int, Any, Any], None] | None = None,
                 callback_steps: int = 1, output_type: str = "pil") -> NoopOutput:
        def adapter(_pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
            if callback is not None and i % callback_steps == 0:
                callback(i, t, None)
            return kwargs

        inner = self._inner
        inner._interrupt = False
        inner.before_block = self.before_block
        result = inner(prompt, negative_prompt, num_inference_steps, guidance_scale, generator, height, width,
                       num_images_per_prompt, callback_on_step_end=adapter)
        return result
