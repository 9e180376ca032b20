"""Shapes of tensors between pixels and the FLUX transformer.

Images are cut into ``patch`` x ``patch`` pixel patches, each flattened to one token of
``3 * patch**2`` channels; FLUX's own ``patch_size`` stays 1 because the packing happens
here, exactly as the FLUX pipeline packs 2x2 latent patches before the transformer.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel


def build_transformer(patch: int = 4, width_heads: int = 6, head_dim: int = 32, num_layers: int = 2,
                      num_single_layers: int = 2, text_dim: int = 128, pooled_dim: int = 128) -> FluxTransformer2DModel:
    channels = 3 * patch * patch
    # RoPE splits each head over (unused, row, col) axes; sizes must be even and sum to head_dim.
    side = (head_dim // 8) * 4 if head_dim >= 16 else head_dim // 2
    first = head_dim - 2 * side
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=channels,
        out_channels=channels,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=width_heads,
        joint_attention_dim=text_dim,
        pooled_projection_dim=pooled_dim,
        guidance_embeds=False,
        axes_dims_rope=(first, side, side),
    )


def pack(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, H/p * W/p, 3*p*p), row-major over patches."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack(tokens: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """Inverse of :func:`pack`."""
    b = tokens.shape[0]
    gh, gw = height // patch, width // patch
    x = tokens.reshape(b, gh, gw, 3, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, 3, height, width)


def image_ids(height: int, width: int, patch: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """FLUX position ids (0, row, col) for every image token."""
    gh, gw = height // patch, width // patch
    ids = torch.zeros(gh, gw, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(gh, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(gw, device=device, dtype=dtype)[None, :]
    return ids.reshape(gh * gw, 3)


def text_ids(length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(length, 3, device=device, dtype=dtype)
