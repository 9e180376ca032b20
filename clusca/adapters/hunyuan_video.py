"""Lean cached step of ``HunyuanVideoTransformer3DModel`` (see ``dual_stream``).

Its dual-stream blocks compute what FLUX's do. The token refiner, the attention mask and
the rotary embeddings serve only the text stream and attention, so a cached step skips
them. The token-replace variant (image-to-video) keeps the module hooks.
"""

from __future__ import annotations

import torch

from .dual_stream import DualStreamLeanStep


class HunyuanVideoLeanStep(DualStreamLeanStep):
    @classmethod
    def build(cls, model, ctrl, hooks):
        if getattr(model.config, "image_condition_type", None) == "token_replace":
            return None
        return super().build(model, ctrl, hooks)

    def accepts(self, args: tuple, kwargs: dict) -> bool:
        return not kwargs.get("attention_kwargs")

    def embed(self, hs: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        temb, _ = model.time_text_embed(kwargs["timestep"], kwargs.get("pooled_projections"), kwargs.get("guidance"))
        return model.x_embedder(hs), temb

    def finish(self, x: torch.Tensor, temb: torch.Tensor, hs: torch.Tensor, kwargs: dict) -> torch.Tensor:
        model = self.model
        b, _, frames, height, width = hs.shape
        p, p_t = model.config.patch_size, model.config.patch_size_t
        out = model.proj_out(model.norm_out(x, temb))
        out = out.reshape(b, frames // p_t, height // p, width // p, -1, p_t, p, p)
        out = out.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return out
