"""Lean cached step of ``SD3Transformer2DModel`` (see ``dual_stream``).

SD3 has dual-stream blocks only; SD3.5's second attention (``attn2``) is one more predicted
output per block.
"""

from __future__ import annotations

import torch

from .dual_stream import DualStreamLeanStep


class SD3LeanStep(DualStreamLeanStep):
    singles_attr = None

    def accepts(self, args: tuple, kwargs: dict) -> bool:
        return not kwargs.get("joint_attention_kwargs") and kwargs.get("block_controlnet_hidden_states") is None \
            and kwargs.get("skip_layers") is None

    def embed(self, hs: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        x = model.pos_embed(hs).contiguous()
        return x, model.time_text_embed(kwargs["timestep"], kwargs.get("pooled_projections"))

    def finish(self, x: torch.Tensor, temb: torch.Tensor, hs: torch.Tensor, kwargs: dict) -> torch.Tensor:
        model = self.model
        p = model.config.patch_size
        h, w = hs.shape[-2] // p, hs.shape[-1] // p
        out = model.proj_out(model.norm_out(x, temb))
        out = out.reshape(out.shape[0], h, w, p, p, model.out_channels)
        out = torch.einsum("nhwpqc->nchpwq", out).reshape(out.shape[0], model.out_channels, h * p, w * p)
        return out
