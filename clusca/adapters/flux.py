"""Lean cached step of ``FluxTransformer2DModel`` (see ``dual_stream``)."""

from __future__ import annotations

import torch

from .dual_stream import DualStreamLeanStep


class FluxLeanStep(DualStreamLeanStep):
    def accepts(self, args: tuple, kwargs: dict) -> bool:
        # LoRA scale and IP-adapter ride in joint_attention_kwargs; ControlNet adds residuals.
        return not kwargs.get("joint_attention_kwargs") and kwargs.get("controlnet_block_samples") is None \
            and kwargs.get("controlnet_single_block_samples") is None

    def embed(self, hs: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        x = model.x_embedder(hs)
        t = kwargs["timestep"].to(x.dtype) * 1000
        guidance, pooled = kwargs.get("guidance"), kwargs.get("pooled_projections")
        if guidance is None:
            return x, model.time_text_embed(t, pooled)
        return x, model.time_text_embed(t, guidance.to(x.dtype) * 1000, pooled)

    def finish(self, x: torch.Tensor, temb: torch.Tensor, hs: torch.Tensor, kwargs: dict) -> torch.Tensor:
        return self.model.proj_out(self.model.norm_out(x, temb))
