"""Lean cached step of ``FluxTransformer2DModel``.

On a cached step, with the shipped patterns, the result of a FLUX call depends only on:
the timestep embedding; per dual-stream block, the modulation (its gates and the shift and
scale of the feed-forward input), the predicted image attention output, the fresh tokens'
feed-forward and the predicted image feed-forward output; the summed prediction of the
single-stream blocks' image contribution; the output norm and projection. The text stream,
the rotary embeddings and the image-side attention norms reach only predicted modules or
dropped tokens, so they are not computed. The modulations of all dual blocks are stacked
once per step, and every view a step reads is made when its buffer is allocated.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _plain(mod: nn.Module, cls: type) -> bool:
    """``mod`` is exactly ``cls`` with no hooks of anyone's on it: calling its function
    directly is the same as calling the module."""
    return (type(mod) is cls and "_diffusers_hook" not in mod.__dict__ and not mod._forward_hooks
            and not mod._forward_pre_hooks)


def _linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, mod.weight, mod.bias) if _plain(mod, nn.Linear) else mod(x)


def _gelu_ff(ff: nn.Module):
    """(first linear, approximation, last linear) of a plain diffusers ``FeedForward`` with a
    GELU activation, or ``None`` for any other feed-forward (then the module is called)."""
    net = getattr(ff, "net", None)
    if not isinstance(net, nn.ModuleList) or len(net) not in (3, 4) or type(net[0]).__name__ != "GELU":
        return None
    act, mid, out = net[0], net[1], net[2]
    rest = list(net)[3:]
    if not all(type(m) is nn.Dropout for m in (mid, *rest)) or not _plain(out, nn.Linear):
        return None
    if not _plain(getattr(act, "proj", None), nn.Linear) or "_diffusers_hook" in act.__dict__ or act._forward_hooks:
        return None
    return act.proj, act.approximate, out


class FluxLeanStep:
    def __init__(self, model, attn: list[int], ff: list[int], ff_hooks: list, chain_head: int, image_out: int) -> None:
        self.model = model
        self.blocks = list(model.transformer_blocks)
        self.attn = attn  # slot index of each dual block's attention
        self.ff = ff  # slot index of each dual block's image feed-forward
        self.ff_hooks = ff_hooks  # their hooks: the forward under them, clusters, write-back
        self.chain_head = chain_head  # slot holding the summed factors of the single-stream blocks
        self.image_out = image_out  # index of the image tokens among a single block's outputs
        self.inner_dim = model.inner_dim

    @classmethod
    def build(cls, model, ctrl, hooks: list) -> "FluxLeanStep | None":
        by_name = {s.name: s for s in ctrl.slots}
        blocks, singles = getattr(model, "transformer_blocks", None), getattr(model, "single_transformer_blocks", None)
        if blocks is None or singles is None or not len(blocks) or not len(singles):
            return None
        attn, ff = [], []
        for i, blk in enumerate(blocks):
            a, f = by_name.get(f"transformer_blocks.{i}.attn"), by_name.get(f"transformer_blocks.{i}.ff")
            norm1 = getattr(blk, "norm1", None)
            if a is None or f is None or norm1 is None or getattr(norm1, "emb", None) is not None:
                return None
            if not hasattr(norm1, "linear") or not hasattr(blk, "norm2"):
                return None
            attn.append(a.index)
            ff.append(f.index)
        heads = {by_name.get(f"single_transformer_blocks.{i}") for i in range(len(singles))}
        if None in heads:
            return None
        head = ctrl.slots[min(s.index for s in heads)]
        if head.chain_len != len(singles) or "hidden_states" not in [r for r, _ in head.residuals]:
            return None
        image_out = [r for r, _ in head.residuals].index("hidden_states")
        return cls(model, attn, ff, [hooks[i] for i in ff], head.index, image_out)

    def cached_step(self, ctrl, args: tuple, kwargs: dict) -> Any:
        """The transformer's output for this cached call, or ``None`` to leave it to the hooks."""
        if torch.is_grad_enabled() or len(args) > 1 or ctrl.config.refresh_text:
            return None
        if kwargs.get("joint_attention_kwargs") or kwargs.get("controlnet_block_samples") is not None \
                or kwargs.get("controlnet_single_block_samples") is not None:
            return None
        hs = args[0] if args else kwargs.get("hidden_states")
        timestep = kwargs.get("timestep")
        if not isinstance(hs, torch.Tensor) or hs.ndim != 3 or not isinstance(timestep, torch.Tensor):
            return None
        branch = ctrl.branch
        slots = branch.slots
        shape = (*hs.shape[:2], self.inner_dim)
        for i in self.attn:
            if slots[i].n == 0 or slots[i].in_shape != shape:
                return None
        for i in self.ff:
            if slots[i].n == 0 or slots[i].in_shape != shape or slots[i].structure is not None:
                return None
        head = slots[self.chain_head]
        if head.n == 0 or head.factors is None or head.factors_of(self.image_out) is None:
            return None

        model = self.model
        x = model.x_embedder(hs)
        t = timestep.to(x.dtype) * 1000
        guidance = kwargs.get("guidance")
        pooled = kwargs.get("pooled_projections")
        if guidance is None:
            temb = model.time_text_embed(t, pooled)
        else:
            temb = model.time_text_embed(t, guidance.to(x.dtype) * 1000, pooled)
        self._dual_blocks(ctrl, x, temb)
        x = head.factors_of(self.image_out).predict(ctrl.coeffs_for(head), base=x)
        out = model.proj_out(model.norm_out(x, temb))
        if kwargs.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out)
        return (out,)

    def _dual_blocks(self, ctrl, x: torch.Tensor, temb: torch.Tensor) -> None:
        """Update the image tokens ``x`` in place through every dual-stream block."""
        b, _, dim = x.shape
        n_blocks = len(self.blocks)
        s = F.silu(temb)
        mods = torch.stack([_linear(blk.norm1.linear, s) for blk in self.blocks])  # (blocks, b, 6 * dim)
        # Chunks of AdaLayerNormZero: shift/scale/gate of attention, then of the feed-forward.
        # One sample: (dim,) vectors broadcast over tokens and fresh rows alike.
        parts = mods.view(n_blocks, 6, dim).unbind(1) if b == 1 else mods.view(n_blocks, b, 6, 1, dim).unbind(2)
        gate_msa, gate_mlp = parts[2].unbind(0), parts[5].unbind(0)
        slots = ctrl.branch.slots
        fresh = [hook.clusters_for(x, slots[i]) for hook, i in zip(self.ff_hooks, self.ff)]
        if any(c is not None for c in fresh):
            shift_mlp = parts[3].unbind(0)
            scale_mlp = parts[4].add(1).unbind(0)
            x_rows = x.view(-1, dim)
            group_rows = ctrl.fresh_rows("image", next(c for c in fresh if c is not None))
        fp16 = x.dtype == torch.float16
        for blk_i, blk in enumerate(self.blocks):
            st_a = slots[self.attn[blk_i]]
            x.addcmul_(gate_msa[blk_i], st_a.factors[0].predict(ctrl.coeffs_for(st_a), copy=False))
            st_f = slots[self.ff[blk_i]]
            coeffs = ctrl.coeffs_for(st_f)
            clusters = fresh[blk_i]
            if clusters is not None:
                hook = self.ff_hooks[blk_i]
                rows = group_rows[hook.slot.group_pos]
                xs = x_rows.index_select(0, rows)
                if b > 1:
                    xs = xs.view(b, -1, dim)
                norm = blk.norm2
                xs = F.layer_norm(xs, norm.normalized_shape, norm.weight, norm.bias, norm.eps) \
                    if _plain(norm, nn.LayerNorm) else norm(xs)
                h = torch.addcmul(shift_mlp[blk_i], xs, scale_mlp[blk_i])
                parts_ff = _gelu_ff(blk.ff)
                if parts_ff is None:
                    y = hook.fn_ref.original_forward(h)
                else:
                    first, approximate, last = parts_ff
                    y = F.linear(F.gelu(F.linear(h, first.weight, first.bias), approximate=approximate),
                                 last.weight, last.bias)
                hook.refresh(st_f, y, rows, clusters, coeffs)
            x.addcmul_(gate_mlp[blk_i], st_f.factors[0].predict(coeffs, copy=False))
            if fp16:
                x.clamp_(-65504, 65504)
