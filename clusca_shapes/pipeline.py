"""``ShapesFluxPipeline``: text-to-image with the built-in FLUX-architecture model.

It follows the diffusers FLUX pipeline's calling convention (prompt, negative prompt,
steps, guidance, per-image generators, ``callback_on_step_end``, ``_interrupt``), so the
service drives it, and the ClusCa hooks attach to ``pipe.transformer``, exactly as for a
full-size FLUX pipeline. It edits too, without retraining: with ``image`` and ``strength`` it
starts from the image noised to the flow-matching level of its first denoised step and runs only
the last ``strength`` share of the steps (image-to-image); with ``mask_image`` as well, after every
step the region outside the mask is set back to the image noised to that step's level, and to the
image itself at the end (inpainting). Differences from FLUX: pixel space instead of a VAE latent
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


def edit_start(steps: int, strength: float) -> int:
    """The first step an edit of ``strength`` denoises: diffusers' image-to-image rule (the last
    ``steps * strength`` steps run, rounded the way its pipelines round them)."""
    return int(max(steps - steps * strength, 0))


def _as_batch(value, name: str, prompts: int, per_prompt: int, mode: str) -> torch.Tensor:
    """One image (or a list, one per prompt) as a float tensor (B, C, H, W) in [0, 1]."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(items) == 1:
        items = items * prompts
    if len(items) != prompts:
        raise ValueError(f"{name} has {len(items)} entries but prompt has {prompts}")
    arrays = []
    for im in items:
        if not isinstance(im, PIL.Image.Image):
            raise ValueError(f"{name} must be a PIL image or a list of them")
        arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
        arrays.append(arr[..., None] if arr.ndim == 2 else arr)
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"the images of {name} differ in size")
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch.repeat_interleave(per_prompt, dim=0)


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

    def _edit_inputs(self, image, mask_image, strength: float, steps: int, prompts: int, per_prompt: int, height: int,
                     width: int, device) -> tuple[int, torch.Tensor, torch.Tensor | None]:
        """The first denoised step, the image packed as tokens in [-1, 1], and the packed mask
        (1 = repaint, 0 = keep; None without a mask)."""
        x0 = _as_batch(image, "image", prompts, per_prompt, "RGB")
        if x0.shape[-2:] != (height, width):
            raise ValueError(f"image is {x0.shape[-1]}x{x0.shape[-2]} but the call asks for {width}x{height}")
        known = pack((x0 * 2.0 - 1.0).to(device), self.patch_size)
        repaint = None
        if mask_image is not None:
            m = _as_batch(mask_image, "mask_image", prompts, per_prompt, "L")
            if m.shape[-2:] != (height, width):
                raise ValueError(f"mask_image is {m.shape[-1]}x{m.shape[-2]} but image is {width}x{height}")
            # A hard mask: a pixel is repainted or kept, so kept pixels come back exactly.
            repaint = pack((m >= 0.5).float().expand(-1, 3, -1, -1).to(device), self.patch_size)
        return edit_start(steps, strength), known, repaint

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
        image: PIL.Image.Image | list[PIL.Image.Image] | None = None,
        strength: float = 0.8,
        mask_image: PIL.Image.Image | list[PIL.Image.Image] | None = None,
    ) -> ShapesPipelineOutput | tuple:
        steps = self.default_steps if num_inference_steps is None else num_inference_steps
        guidance = self.default_guidance if guidance_scale is None else guidance_scale
        first = image[0] if isinstance(image, (list, tuple)) and image else image
        size = first.size if isinstance(first, PIL.Image.Image) else (self.default_size[1], self.default_size[0])
        height = size[1] if height is None else height
        width = size[0] if width is None else width
        self.check_inputs(height, width, steps, guidance, num_images_per_prompt, output_type)
        if mask_image is not None and image is None:
            raise ValueError("mask_image needs an image to inpaint")
        if image is not None and (isinstance(strength, bool) or not isinstance(strength, (int, float))
                                  or not 0 < strength <= 1):
            raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
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
        start = 0
        known = repaint = None
        if image is not None:
            start, known, repaint = self._edit_inputs(image, mask_image, strength, steps,
                                                      len(prompts) // num_images_per_prompt, num_images_per_prompt,
                                                      height, width, device)
            timesteps = timesteps[start:]
            self.scheduler.set_begin_index(start)
            sigma = float(self.scheduler.sigmas[start])
            noise_packed = latents
            latents = (1.0 - sigma) * known + sigma * noise_packed
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
            if repaint is not None:
                # Outside the mask the sample is the image itself, noised to the level just reached.
                sigma = float(self.scheduler.sigmas[start + i + 1])
                latents = repaint * latents + (1.0 - repaint) * ((1.0 - sigma) * known + sigma * noise_packed)
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
