"""``ShapesFluxPipeline``: text-to-image with the built-in FLUX-architecture model.

It follows the diffusers FLUX pipeline's calling convention (prompt, negative prompt,
steps, guidance, per-image generators, ``callback_on_step_end``, ``_interrupt``), so the
service drives it, and the ClusCa hooks attach to ``pipe.transformer``, exactly as for a
full-size FLUX pipeline. Differences from FLUX: pixel space instead of a VAE latent
(patches of ``patch_size`` pixels are packed into tokens), a small word-level text
encoder trained with the model, and true classifier-free guidance with the conditional
and unconditional halves run as ONE transformer call per step, so a step cache sees one
forward per denoising step.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from . import INDEX_DEFAULTS, PIPELINE_LIMITS, read_index
from .model import image_ids, pack, text_ids, unpack
from .text import ShapesTextEncoder, WordTokenizer

DEFAULT_STEPS = INDEX_DEFAULTS["default_steps"]
DEFAULT_GUIDANCE = INDEX_DEFAULTS["default_guidance"]
DEFAULT_SIZE = (INDEX_DEFAULTS["default_height"], INDEX_DEFAULTS["default_width"])
# Defaults of the limits; a checkpoint's model_index.json may declare its own ("limits").
MAX_SIDE = PIPELINE_LIMITS["max_side"]
MAX_PIXELS = PIPELINE_LIMITS["max_pixels"]
MAX_STEPS = PIPELINE_LIMITS["max_steps"]
MAX_IMAGES = PIPELINE_LIMITS["max_images"]
OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class ShapesPipelineOutput(BaseOutput):
    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class ShapesFluxPipeline(DiffusionPipeline):
    """Pixel-space FLUX text-to-image pipeline for the built-in shapes model."""

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        text_encoder: ShapesTextEncoder,
        tokenizer: WordTokenizer,
        scheduler: FlowMatchEulerDiscreteScheduler,
        patch_size: int = 4,
        default_steps: int = DEFAULT_STEPS,
        default_guidance: float = DEFAULT_GUIDANCE,
        limits: dict | None = None,
        default_size: tuple[int, int] = DEFAULT_SIZE,
        default_cache: str = INDEX_DEFAULTS["default_cache"],
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
        )
        self.register_to_config(
            patch_size=patch_size, default_steps=default_steps, default_guidance=default_guidance
        )
        self.patch_size = patch_size
        self.default_steps = default_steps
        self.default_guidance = default_guidance
        # (height, width) when a call names none, and the ClusCa preset the service uses by default.
        self.default_size = (int(default_size[0]), int(default_size[1]))
        self.default_cache = default_cache
        # What check_inputs accepts; the service reads the same numbers from the checkpoint index.
        self.limits = {**PIPELINE_LIMITS, **(limits or {})}
        self._interrupt = False

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, torch_dtype: torch.dtype | None = None, **_: object) -> "ShapesFluxPipeline":
        """Load a checkpoint folder written by :meth:`save_pretrained` (never touches a hub)."""
        folder = os.fspath(folder)
        index_path = os.path.join(folder, "model_index.json")
        if not os.path.isfile(index_path):
            raise ValueError(f"{folder!r} is not a shapes model folder (no model_index.json)")
        index = read_index(folder)
        kw = {"local_files_only": True}
        transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", **kw)
        text_encoder = ShapesTextEncoder.from_pretrained(folder, subfolder="text_encoder", **kw)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler", **kw)
        tokenizer = WordTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
        pipe = cls(
            transformer.eval(), text_encoder.eval(), tokenizer, scheduler,
            patch_size=int(index["patch_size"]),
            default_steps=int(index["default_steps"]),
            default_guidance=float(index["default_guidance"]),
            limits={k: int(v) for k, v in index["limits"].items() if k in PIPELINE_LIMITS},
            default_size=(int(index["default_height"]), int(index["default_width"])),
            default_cache=str(index["default_cache"]),
        )
        # ClusCa preset tuning measured for this checkpoint; the service applies it, the
        # pipeline only carries it from one save to the next.
        pipe.cache_presets = dict(index["cache_presets"])
        if torch_dtype is not None:
            pipe.to(dtype=torch_dtype)
        return pipe

    def save_pretrained(self, folder: str | os.PathLike, **_: object) -> None:
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        self.transformer.save_pretrained(os.path.join(folder, "transformer"))
        self.text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))
        self.scheduler.save_pretrained(os.path.join(folder, "scheduler"))
        self.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
        index = {
            "_class_name": type(self).__name__,
            "patch_size": self.patch_size,
            "default_steps": self.default_steps,
            "default_guidance": self.default_guidance,
            "default_width": self.default_size[1],
            "default_height": self.default_size[0],
            "default_cache": self.default_cache,
            "limits": dict(self.limits),
            "transformer": ["diffusers", "FluxTransformer2DModel"],
            "text_encoder": ["clusca_shapes.text", "ShapesTextEncoder"],
            "tokenizer": ["clusca_shapes.text", "WordTokenizer"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        }
        if getattr(self, "cache_presets", None):
            index["cache_presets"] = self.cache_presets
        with open(os.path.join(folder, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)

    # ------------------------------------------------------------------ properties
    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    # ------------------------------------------------------------------ helpers
    @torch.inference_mode()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer(prompts)
        device = self.text_encoder.device
        seq, pooled = self.text_encoder(ids.to(device), mask.to(device))
        return seq, pooled

    @staticmethod
    def _as_prompt_list(value, name: str, batch: int | None = None) -> list[str]:
        if value is None:
            value = [""] * (batch or 1)
        if isinstance(value, str):
            value = [value] * (batch or 1)
        if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
            raise ValueError(f"{name} must be a string or a list of strings")
        if not value:
            raise ValueError(f"{name} must not be an empty list")
        if batch is not None and len(value) != batch:
            raise ValueError(f"{name} has {len(value)} entries but prompt has {batch}")
        return list(value)

    def check_inputs(self, height, width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type):
        p = self.patch_size
        lim = self.limits
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
            if v % p:
                raise ValueError(f"{name} must be a multiple of the patch size {p}, got {v}")
            if v > lim["max_side"]:
                raise ValueError(f"{name} must be at most {lim['max_side']}, got {v}")
        if height * width > lim["max_pixels"]:
            raise ValueError(f"height x width must be at most {lim['max_pixels']} pixels, got {height * width}")
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or not 1 <= num_inference_steps <= lim["max_steps"]:
            raise ValueError(f"num_inference_steps must be an integer in [1, {lim['max_steps']}], got {num_inference_steps!r}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if not isinstance(num_images_per_prompt, int) or isinstance(num_images_per_prompt, bool) or not 1 <= num_images_per_prompt <= lim["max_images"]:
            raise ValueError(f"num_images_per_prompt must be an integer in [1, {lim['max_images']}], got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")

    # ------------------------------------------------------------------ sampling
    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        callback_on_step_end: Callable[["ShapesFluxPipeline", int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ShapesPipelineOutput | tuple:
        steps = self.default_steps if num_inference_steps is None else num_inference_steps
        guidance = self.default_guidance if guidance_scale is None else guidance_scale
        height = self.default_size[0] if height is None else height
        width = self.default_size[1] if width is None else width
        self.check_inputs(height, width, steps, guidance, num_images_per_prompt, output_type)
        prompts = self._as_prompt_list(prompt, "prompt")
        negatives = self._as_prompt_list(negative_prompt, "negative_prompt", len(prompts))
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        batch = len(prompts)
        if isinstance(generator, (list, tuple)) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} images; pass one per image")
        for name in callback_on_step_end_tensor_inputs:
            if name != "latents":
                raise ValueError(f"callback tensor input {name!r} is not available; only 'latents' is")

        self._guidance_scale = float(guidance)
        self._interrupt = False
        device = self.transformer.device
        dtype = self.transformer.dtype
        use_cfg = guidance > 1.0

        seq, pooled = self.encode_prompt(negatives + prompts if use_cfg else prompts)
        seq, pooled = seq.to(dtype), pooled.to(dtype)
        img_ids = image_ids(height, width, self.patch_size, device=device, dtype=dtype)
        txt_ids = text_ids(seq.shape[1], device=device, dtype=dtype)

        # Noise is drawn in pixel space one image at a time from its own generator, so a
        # sample does not depend on what else shares its batch.
        noise = randn_tensor((batch, 3, height, width), generator=generator, device=device, dtype=torch.float32)
        latents = pack(noise, self.patch_size)

        self.scheduler.set_timesteps(steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        for i, t in enumerate(timesteps):
            if self._interrupt:
                break
            model_in = torch.cat([latents, latents]) if use_cfg else latents
            tt = (t / 1000.0).expand(model_in.shape[0]).to(dtype)
            v = self.transformer(
                hidden_states=model_in.to(dtype), encoder_hidden_states=seq, pooled_projections=pooled,
                timestep=tt, img_ids=img_ids, txt_ids=txt_ids, return_dict=False,
            )[0].float()
            if use_cfg:
                v_uncond, v_cond = v.chunk(2)
                v = v_uncond + guidance * (v_cond - v_uncond)
            latents = self.scheduler.step(v, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                out = callback_on_step_end(self, i, t, {"latents": latents}) or {}
                latents = out.get("latents", latents)

        images = (unpack(latents, height, width, self.patch_size) / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            # A plain tensor, not an inference tensor: the caller may go on to use it with autograd.
            with torch.inference_mode(False):
                result = images.clone()
        else:
            arr = images.permute(0, 2, 3, 1).cpu().numpy()
            result = arr if output_type == "np" else [PIL.Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (result,)
        return ShapesPipelineOutput(images=result)
