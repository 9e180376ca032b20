"""The lean cached step shared by dual-stream transformers (FLUX, HunyuanVideo, SD3).

On a cached step, with the shipped patterns, the result of such a call depends only on:
the timestep embedding; per dual-stream block, the modulation (its gates and the shift and
scale of the feed-forward input), the predicted image attention output(s), the fresh
tokens' feed-forward and the predicted image feed-forward output; the summed prediction of
the single-stream blocks' image contribution (where there are any); the output norm and
projection. The text stream, the rotary embeddings and the image-side attention norms reach
only predicted modules or dropped tokens, so they are not computed. The modulations of all
blocks are stacked once per step, and every view a step reads is made when its buffer is
allocated. A subclass says how its model embeds the input and shapes the output.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import captured_step
from ..fresh import write_fresh
from ..taylor import Factors

# The compiled block step by compile settings, shared by every model: one code object,
# one set of graphs.
_COMPILED_STEPS: dict[str, Any] = {}

# AdaLayerNormZero's chunks: shift/scale/gate of attention, then of the feed-forward; SD3.5's
# dual-attention variant adds shift/scale/gate of the second attention.
_GATE_MSA, _SHIFT_MLP, _SCALE_MLP, _GATE_MLP, _GATE_MSA2 = 2, 3, 4, 5, 8


class DualStreamLeanStep:
    """Subclasses set ``singles_attr`` (or ``None``) and implement ``accepts``, ``embed`` and
    ``finish``."""

    singles_attr: str | None = "single_transformer_blocks"

    def __init__(self, model, attn: list[int], attn2: list[int | None], ff: list[int], ff_hooks: list,
                 chain_head: int | None, image_out: int, chunks: list[int]) -> None:
        self.model = model
        self.blocks = list(model.transformer_blocks)
        self.attn = attn  # slot index of each dual block's attention
        self.attn2 = attn2  # and of its second attention (SD3.5), or None, per block
        self.ff = ff  # slot index of each dual block's image feed-forward
        self.ff_hooks = ff_hooks  # their hooks: the forward under them, clusters, write-back
        self.chain_head = chain_head  # slot holding the summed factors of the single-stream blocks
        self.image_out = image_out  # index of the image tokens among a single block's outputs
        self.chunks = chunks  # modulation chunks per block (6, or 9 with a second attention)
        # Blocks with the same chunk count have their modulations stacked together.
        self.groups = [[i for i, c in enumerate(chunks) if c == n] for n in sorted(set(chunks))]
        # Every slot a cached step reads.
        self.used_slots = [*attn, *ff, *(a for a in attn2 if a is not None), *([chain_head] if chain_head is not None else [])]
        self.block_fn = dual_block_step  # or its torch.compile'd form (clusca.compile_clusca)
        self.compiled = False
        self._scalars: dict[tuple, torch.Tensor] = {}

    # ---------------------------------------------------------------- per architecture
    def accepts(self, args: tuple, kwargs: dict) -> bool:
        """Whether this call is one the lean step was written for."""
        raise NotImplementedError

    def embed(self, hs: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(image tokens, timestep embedding) of the call."""
        raise NotImplementedError

    def finish(self, x: torch.Tensor, temb: torch.Tensor, hs: torch.Tensor, kwargs: dict) -> Any:
        """The model's output from the final image tokens."""
        raise NotImplementedError

    @staticmethod
    def output(sample: torch.Tensor, kwargs: dict) -> Any:
        if kwargs.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=sample)
        return (sample,)

    # ---------------------------------------------------------------- compile
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

    # ---------------------------------------------------------------- build
    @classmethod
    def build(cls, model, ctrl, hooks: list) -> "DualStreamLeanStep | None":
        """The adapter for ``model``, or ``None`` when its layout is not the expected one."""
        by_name = {s.name: s for s in ctrl.slots}
        blocks = getattr(model, "transformer_blocks", None)
        if blocks is None or not len(blocks):
            return None
        attn, attn2, ff, chunks = [], [], [], []
        for i, blk in enumerate(blocks):
            a, f = by_name.get(f"transformer_blocks.{i}.attn"), by_name.get(f"transformer_blocks.{i}.ff")
            norm1 = getattr(blk, "norm1", None)
            linear = getattr(norm1, "linear", None)
            if a is None or f is None or linear is None or getattr(norm1, "emb", None) is not None \
                    or not isinstance(getattr(blk, "norm2", None), nn.LayerNorm):
                return None
            n = linear.out_features // linear.in_features
            a2 = by_name.get(f"transformer_blocks.{i}.attn2")
            if n not in (6, 9) or (n == 9) != (a2 is not None):
                return None
            chunks.append(n)
            attn.append(a.index)
            ff.append(f.index)
            attn2.append(a2.index if a2 is not None else None)
        head, image_out = None, 0
        if cls.singles_attr is not None:
            singles = getattr(model, cls.singles_attr, None)
            if singles is None or not len(singles):
                return None
            heads = [by_name.get(f"{cls.singles_attr}.{i}") for i in range(len(singles))]
            if None in heads:
                return None
            first = ctrl.slots[min(s.index for s in heads)]
            names = [r for r, _ in first.residuals]
            if first.chain_len != len(singles) or "hidden_states" not in names:
                return None
            head, image_out = first.index, names.index("hidden_states")
        return cls(model, attn, attn2, ff, [hooks[i] for i in ff], head, image_out, chunks)

    # ---------------------------------------------------------------- the step
    # The call's tensors the embedding reads (a captured step copies them into its buffers).
    input_names: tuple[str, ...] = ("timestep", "guidance", "pooled_projections")

    def cached_step(self, ctrl, args: tuple, kwargs: dict) -> Any:
        """The transformer's output for this cached call, or ``None`` to leave it to the hooks."""
        if torch.is_grad_enabled() or len(args) > 1 or ctrl.config.refresh_text or not self.accepts(args, kwargs):
            return None
        hs = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hs, torch.Tensor) or not isinstance(kwargs.get("timestep"), torch.Tensor):
            return None
        slots = ctrl.branch.slots
        head = slots[self.chain_head] if self.chain_head is not None else None
        if head is not None and (head.n == 0 or head.factors is None or head.factors_of(self.image_out) is None):
            return None
        for i in (*self.attn, *(a for a in self.attn2 if a is not None), *self.ff):
            if slots[i].n == 0 or not slots[i].factors:
                return None
        if ctrl.keeping:
            out = captured_step(self, ctrl, hs, kwargs)
            if out is not None:
                return self.output(out, kwargs)
        x, temb = self.embed(hs, kwargs)
        plan = self.plan(ctrl, x)
        if plan is None:
            return None
        out = self.run_embedded(plan, x, temb, hs, kwargs)
        plan.count(ctrl)
        return self.output(out, kwargs)

    def plan(self, ctrl, x: torch.Tensor, shared_coeffs: bool = False) -> "LeanPlan | None":
        """What this cached call, whose embedded image tokens are ``x``, reads from the cache
        state, or ``None`` when the state does not fit the call (a stale or differently shaped
        cache). With ``shared_coeffs`` every prediction takes the coefficients passed to
        :meth:`run`; then ``None`` also when some module's last full step is not the branch's."""
        slots = ctrl.branch.slots
        shape = x.shape
        for i in (*self.attn, *(a for a in self.attn2 if a is not None), *self.ff):
            if slots[i].in_shape != shape:
                return None
        for i in self.ff:
            if slots[i].structure is not None:
                return None
        n_blocks = len(self.blocks)
        clusters = [hook.clusters_for(x, slots[i]) for hook, i in zip(self.ff_hooks, self.ff)]
        fresh = next((c for c in clusters if c is not None), None)
        rows = ctrl.fresh_rows("image", fresh) if fresh is not None else None
        cfg = ctrl.config
        used = self.used_slots
        if shared_coeffs:
            if any(slots[i].last_full != ctrl.branch.last_full for i in used):
                return None
            coeff = None
        # The divergence guard's measured errors (eager steps only: a compiled or recorded step
        # stays free of Python-side effects).
        errors = ctrl.branch.measure if not (self.compiled or ctrl.keeping) else None
        work = []
        for i in range(n_blocks):
            hook = self.ff_hooks[i]
            c = clusters[i]
            if c is None:
                work.append(None)
                continue
            gamma = self._scalar(hook.gamma, x)
            work.append((hook.slot.group_pos, _norm_fn(self.blocks[i].norm2), _ff_fn(self.blocks[i].ff, hook),
                         gamma, cfg.fresh_tokens, cfg.propagation == "anchored", errors))
        if not shared_coeffs:
            coeff = {i: self._scalar(ctrl.coeffs_for(slots[i]), x) for i in used}
        head = slots[self.chain_head].factors_of(self.image_out) if self.chain_head is not None else None
        return LeanPlan(
            attn=[slots[i].factors[0] for i in self.attn],
            attn2=[slots[i].factors[0] if i is not None else None for i in self.attn2],
            ff=[slots[i].factors[0] for i in self.ff],
            head=head, work=work, coeffs=coeff, rows=rows,
            flat_index=fresh.flat_index if fresh is not None and any(w is not None and w[3] is not None for w in work)
            else None,
            fresh_slots=[(self.ff[i], rows[0].numel()) for i, w in enumerate(work) if w is not None]
            if rows is not None else [],
            n_valid=tuple(slots[i].n for i in used),
        )

    def run(self, plan: "LeanPlan", hs: torch.Tensor, kwargs: dict, coeffs: torch.Tensor | None = None,
            rows: torch.Tensor | None = None, flat_index: torch.Tensor | None = None) -> torch.Tensor:
        """The cached step's sample from ``plan``; tensors only, so it can be recorded as a graph.
        ``coeffs``, ``rows`` and ``flat_index`` replace the plan's (a captured step passes its
        buffers)."""
        x, temb = self.embed(hs, kwargs)
        return self.run_embedded(plan, x, temb, hs, kwargs, coeffs, rows, flat_index)

    def run_embedded(self, plan: "LeanPlan", x: torch.Tensor, temb: torch.Tensor, hs: torch.Tensor, kwargs: dict,
                     coeffs: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                     flat_index: torch.Tensor | None = None) -> torch.Tensor:
        if not x.is_contiguous():
            x = x.contiguous()  # updated in place and read as a (tokens, channels) table
        rows = plan.rows if rows is None else rows
        flat_index = plan.flat_index if flat_index is None else flat_index
        coeff = (lambda i: coeffs) if coeffs is not None else plan.coeffs.__getitem__
        b, _, dim = x.shape
        has_fresh = rows is not None
        gate_msa, gate_mlp, gate_msa2, shift_mlp, scale_mlp = self._modulations(temb, b, dim, has_fresh)
        x_rows = x.view(-1, dim) if has_fresh else None
        block = self.block_fn
        for i in range(len(self.blocks)):
            second = None
            if plan.attn2[i] is not None:
                second = (gate_msa2[i], plan.attn2[i], coeff(self.attn2[i]))
            w = plan.work[i]
            work = None
            if w is not None:
                pos, norm, ff_fn, gamma, per_cluster, anchored, errors = w
                work = (x_rows, rows[pos], shift_mlp[i], scale_mlp[i], norm, ff_fn,
                        flat_index if gamma is not None else None, gamma, per_cluster, anchored, errors)
            block(x, gate_msa[i], gate_mlp[i], plan.attn[i], coeff(self.attn[i]), plan.ff[i], coeff(self.ff[i]),
                  work, second)
        if plan.head is not None:
            x = plan.head.predict(coeff(self.chain_head), base=x)
        return self.finish(x, temb, hs, kwargs)

    def _modulations(self, temb: torch.Tensor, b: int, dim: int, fresh: bool) -> tuple[list, ...]:
        """Per block: the attention gate, the feed-forward gate, the second attention's gate (or
        ``None``), and, when fresh tokens are computed, the feed-forward input's shift and
        ``1 + scale``. One stacked projection result per group of alike blocks; one sample
        gives ``(dim,)`` vectors, which broadcast over tokens and fresh rows alike."""
        n = len(self.blocks)
        gate_msa, gate_mlp, gate_msa2, shift_mlp, scale_mlp = ([None] * n for _ in range(5))
        s = F.silu(temb)
        for idx in self.groups:
            chunks = self.chunks[idx[0]]
            mods = torch.stack([_linear(self.blocks[i].norm1.linear, s) for i in idx])  # (blocks, b, chunks * dim)
            if b == 1:
                parts = mods.view(len(idx), chunks, dim).unbind(1)
            else:
                parts = mods.view(len(idx), b, chunks, 1, dim).unbind(2)
            _unbind_into(gate_msa, idx, parts[_GATE_MSA])
            _unbind_into(gate_mlp, idx, parts[_GATE_MLP])
            if chunks > _GATE_MSA2:
                _unbind_into(gate_msa2, idx, parts[_GATE_MSA2])
            if fresh:
                _unbind_into(shift_mlp, idx, parts[_SHIFT_MLP])
                _unbind_into(scale_mlp, idx, parts[_SCALE_MLP].add(1))
        return gate_msa, gate_mlp, gate_msa2, shift_mlp, scale_mlp


class LeanPlan:
    """What one cached step reads from the cache state: the factors per block, the fresh-token
    work per block, the coefficients per slot, this step's fresh rows (one per layer) and
    cluster index."""

    __slots__ = ("attn", "attn2", "ff", "head", "work", "coeffs", "rows", "flat_index", "fresh_slots", "n_valid")

    def __init__(self, attn, attn2, ff, head, work, coeffs, rows, flat_index, fresh_slots, n_valid) -> None:
        self.attn, self.attn2, self.ff, self.head = attn, attn2, ff, head
        self.work, self.coeffs, self.rows, self.flat_index = work, coeffs, rows, flat_index
        self.fresh_slots = fresh_slots  # (slot index, rows per layer) of each block with fresh tokens
        self.n_valid = n_valid  # valid factors per slot: part of what a recorded step was recorded for

    def frozen(self) -> "LeanPlan":
        """This plan over factors whose count of valid factors stays as it is now. A CUDA
        graph keeps the decisions made while it was recorded (how many factors a prediction
        sums); a later run of the same family reuses the buffers with new ``Factors`` objects,
        so a step replayed by calling it again must not read their changing counts either."""
        def keep(f):
            return f.frozen() if f is not None else None

        return LeanPlan([keep(f) for f in self.attn], [keep(f) for f in self.attn2], [keep(f) for f in self.ff],
                        keep(self.head), self.work, self.coeffs, self.rows, self.flat_index, self.fresh_slots,
                        self.n_valid)

    def count(self, ctrl) -> None:
        """The run's counters for the fresh tokens a step computed (on the host, outside any graph)."""
        slots = ctrl.branch.slots
        for i, n in self.fresh_slots:
            ctrl.count_fresh(slots[i], n)


def _unbind_into(out: list, idx: list[int], t: torch.Tensor) -> None:
    for i, v in zip(idx, t.unbind(0)):
        out[i] = v


def dual_block_step(x: torch.Tensor, gate_msa: torch.Tensor, gate_mlp: torch.Tensor, attn: Factors, attn_coeffs,
                    ff: Factors, ff_coeffs, fresh, second=None) -> None:
    """One dual-stream block of a cached step, on the image tokens ``x`` in place.

    It reads and writes tensors only (the feed-forward's factors in place); the run's
    counters are kept by the caller. That makes it one graph under ``torch.compile``.
    ``second`` is (gate, factors, coefficients) of a second attention (SD3.5), or ``None``.
    """
    x.addcmul_(gate_msa, attn.predict(attn_coeffs, copy=False))
    if second is not None:
        gate2, attn2, coeffs2 = second
        x.addcmul_(gate2, attn2.predict(coeffs2, copy=False))
    if fresh is not None:
        x_rows, rows, shift, scale1, norm, ff_fn, flat_index, gamma, per_cluster, anchored, errors = fresh
        xs = x_rows.index_select(0, rows)
        if x.shape[0] > 1:
            xs = xs.view(x.shape[0], -1, x.shape[-1])
        y = ff_fn(torch.addcmul(shift, norm(xs), scale1))
        write_fresh(ff, y, rows, flat_index, gamma, per_cluster, anchored, ff_coeffs, errors)
    x.addcmul_(gate_mlp, ff.predict(ff_coeffs, copy=False))
    if x.dtype == torch.float16:
        x.clamp_(-65504, 65504)


def _plain(mod: nn.Module, cls: type) -> bool:
    """``mod`` is exactly ``cls`` with no hooks of anyone's on it: calling its function
    directly is the same as calling the module."""
    return (type(mod) is cls and "_diffusers_hook" not in mod.__dict__ and not mod._forward_hooks
            and not mod._forward_pre_hooks)


def _linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, mod.weight, mod.bias) if _plain(mod, nn.Linear) else mod(x)


def _norm_fn(norm: nn.Module):
    if _plain(norm, nn.LayerNorm):
        return functools.partial(F.layer_norm, normalized_shape=norm.normalized_shape, weight=norm.weight,
                                 bias=norm.bias, eps=norm.eps)
    return norm


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


def _ff_fn(ff: nn.Module, hook):
    parts = _gelu_ff(ff)
    if parts is None:
        return hook.inner  # the module itself, under ClusCa's hook
    first, approximate, last = parts
    return functools.partial(_gelu_mlp, first.weight, first.bias, approximate, last.weight, last.bias)


def _gelu_mlp(w1, b1, approximate: str, w2, b2, h: torch.Tensor) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(h, w1, b1), approximate=approximate), w2, b2)
