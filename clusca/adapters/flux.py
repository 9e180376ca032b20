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

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..fresh import write_fresh
from ..taylor import Factors


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
        self.block_fn = dual_block_step  # or its torch.compile'd form (clusca.compile_clusca)
        self.compiled = False
        self._scalars: dict[tuple, torch.Tensor] = {}

    def compile(self, **compile_kwargs) -> None:
        key = repr(sorted(compile_kwargs.items()))
        if key not in _COMPILED_STEPS:
            _COMPILED_STEPS[key] = torch.compile(dual_block_step, **compile_kwargs)
        self.block_fn = _COMPILED_STEPS[key]
        self.compiled = True

    def uncompile(self) -> None:
        self.block_fn = dual_block_step
        self.compiled = False
        self._scalars.clear()

    def _scalar(self, value, like: torch.Tensor):
        """Eager: the Python number(s) as they are. Compiled: the same as a tensor, made once per
        value, so a new step offset or mixing ratio is new data for the graph, not a recompile."""
        if not self.compiled or value is None:
            return value
        key = (value, like.device, like.dtype)
        t = self._scalars.get(key)
        if t is None:
            if len(self._scalars) >= 256:
                self._scalars.clear()
            t = self._scalars[key] = torch.tensor(value, device=like.device, dtype=like.dtype)
        return t

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
        block = self.block_fn
        cfg = ctrl.config
        anchored = cfg.propagation == "anchored"
        for blk_i, blk in enumerate(self.blocks):
            st_a, st_f = slots[self.attn[blk_i]], slots[self.ff[blk_i]]
            coeffs = ctrl.coeffs_for(st_f)
            clusters = fresh[blk_i]
            work = None
            if clusters is not None:
                hook = self.ff_hooks[blk_i]
                rows = group_rows[hook.slot.group_pos]
                gamma = self._scalar(hook.gamma, x)
                work = (x_rows, rows, shift_mlp[blk_i], scale_mlp[blk_i], _norm_fn(blk.norm2), _ff_fn(blk.ff, hook),
                        clusters.flat_index if gamma is not None else None, gamma, cfg.fresh_tokens, anchored)
            block(x, gate_msa[blk_i], gate_mlp[blk_i], st_a.factors[0], self._scalar(ctrl.coeffs_for(st_a), x),
                  st_f.factors[0], self._scalar(coeffs, x), work)
            if clusters is not None:
                ctrl.count_fresh(st_f, rows.numel())


# The compiled block step by compile settings, shared by every model: one code object,
# one set of graphs.
_COMPILED_STEPS: dict[str, Any] = {}


def dual_block_step(x: torch.Tensor, gate_msa: torch.Tensor, gate_mlp: torch.Tensor, attn: Factors, attn_coeffs,
                    ff: Factors, ff_coeffs, fresh) -> None:
    """One dual-stream block of a cached step, on the image tokens ``x`` in place.

    It reads and writes tensors only (the feed-forward's factors in place); the run's
    counters are kept by the caller. That makes it one graph under ``torch.compile``.
    """
    x.addcmul_(gate_msa, attn.predict(attn_coeffs, copy=False))
    if fresh is not None:
        x_rows, rows, shift, scale1, norm, ff_fn, flat_index, gamma, per_cluster, anchored = fresh
        xs = x_rows.index_select(0, rows)
        if x.shape[0] > 1:
            xs = xs.view(x.shape[0], -1, x.shape[-1])
        y = ff_fn(torch.addcmul(shift, norm(xs), scale1))
        write_fresh(ff, y, rows, flat_index, gamma, per_cluster, anchored, ff_coeffs)
    x.addcmul_(gate_mlp, ff.predict(ff_coeffs, copy=False))
    if x.dtype == torch.float16:
        x.clamp_(-65504, 65504)


def _norm_fn(norm: nn.Module):
    if _plain(norm, nn.LayerNorm):
        return functools.partial(F.layer_norm, normalized_shape=norm.normalized_shape, weight=norm.weight,
                                 bias=norm.bias, eps=norm.eps)
    return norm


def _ff_fn(ff: nn.Module, hook):
    parts = _gelu_ff(ff)
    if parts is None:
        return hook.inner  # the module itself, under ClusCa's hook
    first, approximate, last = parts
    return functools.partial(_gelu_mlp, first.weight, first.bias, approximate, last.weight, last.bias)


def _gelu_mlp(w1, b1, approximate: str, w2, b2, h: torch.Tensor) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(h, w1, b1), approximate=approximate), w2, b2)
