"""Runners for torch pipelines: any diffusers pipeline class, and the base of the built-in model's.

Loading moves the pipeline to its device and dtype and installs the ClusCa hooks on its
transformer; each batch then runs inside a ``clusca_run`` with the request's settings,
under ``torch.inference_mode``. torch, diffusers and clusca are imported only here, so
the API process and the no-op runner never load them.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any

from clusca.stats import RunStats

from service.registry import ModelEntry
from service.worker.runners.base import Batch
from service.worker.runners.pipeline import PipelineRunner

log = logging.getLogger("clusca.worker")


def resolve_device(entry: ModelEntry, default: str) -> str:
    device = entry.device if entry.device != "auto" else default
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def announce_steps(kwargs: dict[str, Any], run: Any) -> dict[str, Any]:
    """``kwargs`` with the step callback also telling the ClusCa run which step comes next.

    The cache then never reads the timestep back from the device to find the step: on a
    GPU that read would wait for the previous step to finish, once per transformer call.
    """
    run.set_step(0)
    out = dict(kwargs)
    on_end = kwargs.get("callback_on_step_end")
    if on_end is not None:
        def on_step_end(pipe: Any, i: int, t: Any, tensors: dict) -> dict:
            result = on_end(pipe, i, t, tensors)
            run.set_step(i + 1)
            return result

        out["callback_on_step_end"] = on_step_end
    legacy = kwargs.get("callback")
    if legacy is not None:
        def callback(i: int, t: Any, latents: Any) -> None:
            legacy(i, t, latents)
            run.set_step(i + 1)

        out["callback"] = callback
    return out


def token_masks(masks: list[Any]) -> list[Any]:
    """Each image's inpainting mask (PIL, white = repaint) as the cache takes it: (height, width)
    bools at the image's resolution, which the cache pools onto the transformer's token grid."""
    import numpy as np
    import torch

    return [torch.from_numpy(np.asarray(m.convert("L")) >= 128) for m in masks]


class DiffusersRunner(PipelineRunner):
    """A diffusers pipeline class (``pipeline_class``, default ``DiffusionPipeline``) from ``path``."""

    @classmethod
    def from_pretrained(cls, entry: ModelEntry, dtype: Any) -> Any:
        import diffusers

        if entry.pipeline_class == "auto":
            pipeline_cls = diffusers.DiffusionPipeline
        else:
            pipeline_cls = getattr(diffusers, entry.pipeline_class, None)
            if not (inspect.isclass(pipeline_cls) and issubclass(pipeline_cls, diffusers.DiffusionPipeline)):
                raise ValueError(f"model {entry.name!r}: {entry.pipeline_class!r} is not a diffusers pipeline class")
        return pipeline_cls.from_pretrained(entry.path, torch_dtype=dtype)

    @classmethod
    def load(cls, entry: ModelEntry, device: str, torch_threads: int = 0) -> "DiffusersRunner":
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        device = resolve_device(entry, device)
        dtype = getattr(torch, entry.dtype)
        pipe = cls.from_pretrained(entry, dtype).to(device)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        if getattr(pipe, "transformer", None) is not None:
            from clusca import apply_clusca

            apply_clusca(pipe.transformer)
        log.info("loaded model %s (%s) on %s", entry.name, type(pipe).__name__, device)
        return cls(entry, device, pipe)

    def attach_adapters(self, source: Any) -> None:
        """A LoRA bank over the transformer's targeted layers (``adapters`` of the registry entry), its
        slots as many as the memory budget allows; without a transformer, no adapters."""
        transformer = getattr(self.pipe, "transformer", None)
        if not self.entry.serves_adapters or transformer is None:
            return
        from service.worker.adapters import AdapterSlots
        from service.worker.runners.lora_slots import LoraBankSlots

        cfg = self.entry.adapters
        try:
            bank = LoraBankSlots(transformer, self.entry, cfg.budget_mb if cfg.budget_mb is not None
                                 else source.budget_mb)
        except ValueError as exc:
            log.warning("model %s serves no adapters: %s", self.entry.name, exc)
            return
        self.adapters = AdapterSlots(self.entry, source, bank=bank, shapes=bank.shapes, slots=bank.slots)
        log.info("model %s: %d adapter slot(s) of rank %d over %d layers (%.1f MiB)", self.entry.name, bank.slots,
                 cfg.max_rank, len(bank.shapes), bank.slots * bank.slot_bytes / (1 << 20))

    def generator(self, seed: int) -> Any:
        import torch

        # CPU generators: the initial noise of a seed is then the same on every device and GPU
        # model, which is what clients expect from "same seed"; drawing it costs next to nothing.
        return torch.Generator(device="cpu").manual_seed(seed)

    def execute(self, kwargs: dict[str, Any], batch: Batch) -> tuple[list[Any], RunStats]:
        import torch
        from clusca import clusca_run

        pipe = self.pipe
        if getattr(pipe, "transformer", None) is None:
            # No transformer (e.g. a UNet pipeline): nothing for ClusCa to cache.
            with torch.inference_mode():
                return self.outputs(pipe(**kwargs)), RunStats.uncached(batch.cache.mode, batch.denoised_steps)
        # The cache's schedule (warm-up, full-step interval) counts the steps the call denoises,
        # from the first of them: an edit's are the last `strength` share of the schedule.
        with torch.inference_mode():
            with clusca_run(pipe.transformer, self.cache_of(batch), num_inference_steps=batch.denoised_steps) as run:
                if batch.masks is not None:
                    # Inpainting: the cache clusters each image's repainted tokens apart (mask_share).
                    run.set_token_mask(token_masks(batch.masks))
                images = self.outputs(pipe(**announce_steps(kwargs, run)))
        return images, run.stats

    @staticmethod
    def cache_of(batch: Batch) -> Any:
        """The call's ClusCa settings: the batch's, adapters or not. A call with adapters records and
        replays its cached steps too: the bank's slot and scale selection lives in buffers written in
        place (a recorded graph reads the current call's), and whether the bank adds a delta at all
        keys the recorded steps (``clusca.capture.add_key_part``), so a step recorded without adapters
        never replays for a call with them, nor the reverse."""
        return batch.cache

    def outputs(self, result: Any) -> list[Any]:
        """The pipeline call's outputs, one per prompt."""
        return list(result.images)

    def warm_up_kwargs(self) -> dict[str, Any]:
        d = self.entry.defaults
        return dict(prompt=["warm-up"], num_inference_steps=2, guidance_scale=d.guidance,
                    generator=[self.generator(0)], height=d.height, width=d.width,
                    num_images_per_prompt=1, output_type="pil", **self.extra_kwargs())

    def free_memory(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def warm_up(self) -> None:
        # The first call of a pipeline pays one-off costs (allocator, kernel selection, lazy
        # imports); paying them here keeps them out of the first client's latency.
        if not self.entry.options.get("warmup", True):
            return
        t0 = time.perf_counter()
        try:
            self.pipe(**self.warm_up_kwargs())
            log.info("model %s warmed up in %.2fs", self.entry.name, time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - a failed warm-up is logged, requests will tell
            log.warning("warm-up of %s failed: %s", self.entry.name, exc)
