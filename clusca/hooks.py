"""ClusCa hook classes on top of ``diffusers.hooks``, each with its explicit state; installed
once by :mod:`clusca.install`, active per run.

The hook kinds, all registered through diffusers' ``HookRegistry``:

* ``ClusCaRootHook`` on the transformer: works out which branch (cache context) and
  denoising step a call belongs to, decides full vs cached, keeps the run counters, and
  hands a cached call to the architecture's lean cached step when it has one.
* ``TaylorHook`` on attention modules: full steps record Taylor factors of the output;
  cached steps return the Taylor prediction without running the module.
* ``BlockHook`` on single-stream blocks: the same, on the block's contribution
  (output minus input), so the prediction follows the block's current input.
* ``FeedForwardHook`` on feed-forward modules: cached steps run the module on one token
  per cluster, propagate the fresh outputs to the cluster's members and return the
  Taylor prediction over the corrected factors.
* ``TextStreamHook`` on the text half of dual-stream blocks: its last full-step output.
* ``ClusterHook`` on the last dual-stream (or last) block: k-means on full steps.

Outside a run, or with mode ``off``, every hook calls the original forward untouched; a
mode ``off`` run goes further and points the hooked modules straight at their own forwards
until it ends, so only the root hook (which keeps the run's statistics) is on the path.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from . import diffusers_compat as compat
from .calls import first_tensor, flatten, get_arg, unflatten
from .controller import ClusCaController, Slot
from .fresh import mix, write_fresh
from .kmeans import kmeans
from .masking import cluster_with_masks
from .state import BranchState, GroupClusters, SlotState

class ClusCaRootHook(compat.ModelHook):
    """Top-level hook: branch and step bookkeeping for the whole transformer."""

    _is_stateful = True

    def __init__(self, controller: ClusCaController) -> None:
        super().__init__()
        self.controller = controller
        # diffusers' cache_context("cond"/"uncond") sets this manager's context; calls
        # without one get a context named after their position within the timestep.
        self.state_manager = compat.StateManager(BranchState, (len(controller.slots),))
        controller.state_manager = self.state_manager

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        ctrl = self.controller
        if not ctrl.active:
            return self.fn_ref.original_forward(*args, **kwargs)
        ctrl.begin_call(args, kwargs)
        try:
            branch = ctrl.branch
            forward = self.fn_ref.original_forward
            if not branch.full and branch.batch and len(branch.tripped) == branch.batch:
                # The guard recomputes every sample: no cached step to run first.
                out = ctrl.recompute(forward, args, kwargs, branch.tripped)
            else:
                out = None
                if not branch.full and ctrl.adapter is not None:
                    out = ctrl.adapter.cached_step(ctrl, args, kwargs)
                if out is None:
                    out = forward(*args, **kwargs)
                else:
                    ctrl.counters.lean_steps += 1
                if not branch.full and ctrl.config.guard:
                    out = ctrl.guard_after(forward, args, kwargs, out)
        except BaseException:
            ctrl.abort_call()
            raise
        ctrl.end_call(out)
        return out

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        # Pipelines call this when they finish; the run's statistics must survive it.
        self.controller.reset_cache()
        return module


class _SlotHook(compat.ModelHook):
    def __init__(self, controller: ClusCaController, slot: Slot) -> None:
        super().__init__()
        self.controller = controller
        self.slot = slot
        self.index = slot.index
        self.compiled: Any = None  # the module's forward under torch.compile (clusca.compile_clusca)

    @property
    def inner(self) -> Any:
        """The module's own forward (compiled, if so asked), for the calls the cache makes."""
        if self.compiled is not None and not self.controller.probe.running:
            return self.compiled
        # The FLOPs probe counts with module hooks, which compiled code does not run.
        return self.fn_ref.original_forward

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not self.controller.caching:
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.run_forward(args, kwargs)

    def run_forward(self, args: tuple, kwargs: dict) -> Any:
        """The module's call during a caching run, on a full step or a cached one."""
        raise NotImplementedError

    def _state(self, args: tuple, kwargs: dict) -> tuple[BranchState, SlotState, torch.Tensor | None]:
        """This call's branch, this module's cache in it, and the module's first input tensor."""
        branch = self.controller.branch
        return branch, branch.slots[self.index], first_tensor(args, kwargs)

    def _compute_and_record(self, st: SlotState, x: torch.Tensor | None, args, kwargs, keep_raw,
                            substitute: torch.Tensor | None) -> Any:
        out = self.inner(*args, **kwargs)
        layout, tensors = flatten(out)
        if self.controller.branch.refresh is None:  # recompute mode runs some samples only
            st.structure = layout
            st.in_shape = x.shape if x is not None else None
        self.controller.record(st, tensors, keep_raw(layout), self.slot.text_pos, substitute)
        return out

    def _predict(self, st: SlotState, coeffs, substitute: torch.Tensor | None) -> Any:
        return unflatten(st.structure, st.outputs([f.predict(coeffs) for f in st.factors], substitute))


def _no_raw(layout) -> bool:
    return False


class TaylorHook(_SlotHook):
    """Predict the whole output of a module (attention) on cached steps."""

    def run_forward(self, args: tuple, kwargs: dict) -> Any:
        ctrl = self.controller
        branch, st, x = self._state(args, kwargs)
        text = kwargs.get("encoder_hidden_states")  # stands in for the text output while it is dead
        if branch.full or st.n == 0 or (x is not None and x.shape != st.in_shape):
            return self._compute_and_record(st, x, args, kwargs, _no_raw, text)
        return self._predict(st, ctrl.coeffs_for(st), text)


class TextStreamHook(_SlotHook):
    """Text half of a dual-stream block: on cached steps, return the last full step's output.

    What such a module computes on a cached step reaches only predicted modules or the
    dropped text tokens (see ``ArchitecturePatterns.text_stream``), so any finite value of
    the right shape gives the same result. An output shaped like the module's input (the
    normalised text tokens) is answered with that input, so nothing of text-token size is
    kept; the other outputs (per-sample gates and shifts) are kept as they are.
    """

    def run_forward(self, args: tuple, kwargs: dict) -> Any:
        ctrl = self.controller
        branch, st, x = self._state(args, kwargs)
        stale = st.n == 0 or (x is not None and x.shape != st.in_shape)
        if branch.refresh is not None:
            out = self.inner(*args, **kwargs)
            self._reanchor(st, out, branch.refresh)
            return out
        if branch.full or stale or ctrl.config.refresh_text:
            out = self.inner(*args, **kwargs)
            if branch.full or stale:
                layout, tensors = flatten(out)
                before = st.nbytes()
                st.kept = [None if x is not None and t.shape == x.shape else t for t in tensors]
                st.n, st.structure = 1, layout
                st.in_shape = x.shape if x is not None else None
                st.last_full = branch.step
                ctrl.counters.add_cache_bytes(st.nbytes() - before)
            if not branch.full:
                ctrl.count_fresh(st, st.tokens)
            return out
        return unflatten(st.structure, [x if t is None else t for t in st.kept])

    @staticmethod
    def _reanchor(st: SlotState, out: Any, rows: torch.Tensor) -> None:
        """The guard's recompute mode: the recomputed samples' rows of the kept outputs."""
        if not st.kept:
            return
        _, tensors = flatten(out)
        if len(tensors) != len(st.kept):
            return
        for j, (kept, t) in enumerate(zip(st.kept, tensors)):
            if kept is not None and t.shape[0] == rows.numel() and t.shape[1:] == kept.shape[1:]:
                st.kept[j] = kept.index_copy(0, rows, t.to(kept.dtype))


class BlockHook(_SlotHook):
    """Predict a block's contribution (output minus input) on cached steps.

    Consecutive blocks of a chain are predicted together: the contributions add up, so
    the head block returns ``input + sum of predicted contributions`` and the others pass
    their inputs through. Same result as block-by-block prediction (Taylor prediction is
    linear in the cached values), with one pass over the tokens instead of one per block.
    A dead text residual (``Slot.text_pos``) is passed through unchanged.
    """

    def _inputs(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        return [get_arg(args, kwargs, name, pos) for name, pos in self.slot.residuals]

    def run_forward(self, args: tuple, kwargs: dict) -> Any:
        ctrl = self.controller
        slot = self.slot
        branch = ctrl.branch
        st = branch.slots[self.index]
        head = branch.slots[slot.chain_head]
        inputs = self._inputs(args, kwargs)
        x = inputs[-1] if inputs else None
        if branch.full or head.n == 0 or (x is not None and x.shape != st.in_shape):
            return self._compute(args, kwargs, branch, st, head, inputs, x)
        if slot.chain_pos > 0:
            return unflatten(st.structure, inputs)
        coeffs = ctrl.coeffs_for(head)
        outs = [inp if f is None else f.predict(coeffs, base=inp)
                for f, inp in ((head.factors_of(j), inp) for j, inp in enumerate(inputs))]
        return unflatten(st.structure, outs)

    def _compute(self, args, kwargs, branch: BranchState, st: SlotState, head: SlotState, inputs, x) -> Any:
        slot = self.slot
        out = self.inner(*args, **kwargs)
        layout, outs = flatten(out)
        if len(outs) != len(inputs) or any(i is None for i in inputs):
            raise TypeError(f"{slot.name}: block outputs do not match the residual inputs {slot.residuals}")
        recomputing = branch.refresh is not None  # the guard runs some samples only
        if not recomputing:
            st.structure = layout
            st.in_shape = x.shape if x is not None else None
        dead = slot.text_pos if self.controller.text_dead else None
        live = [j for j in range(len(outs)) if j != dead]
        chain = branch.chain_acc.get(slot.chain_head)
        if slot.chain_pos == 0 or chain is None:
            chain = branch.chain_acc[slot.chain_head] = _ChainSum()
        chain.add([inputs[j] for j in live], [outs[j] for j in live])
        if slot.chain_pos == slot.chain_len - 1:
            if not recomputing:
                head.structure = layout
            total = chain.total()
            if dead is not None:
                total.insert(dead, inputs[dead])  # the stand-in of a dead residual: its input
            self.controller.record(head, total, keep_raw=False, text_pos=dead, substitute=inputs[dead] if dead is not None else None)
            del branch.chain_acc[slot.chain_head]
        return out


class _ChainSum:
    """Sum of a chain's contributions on a full step, ``sum_k (out_k - in_k)``.

    While each block's input is the previous block's output (the same tensor), the sum
    telescopes to ``last output - first input``: one subtraction per chain instead of two
    operations per block. Where something edits the stream between two blocks (a
    control-net residual), the chain is cut there and its pieces are summed.
    """

    __slots__ = ("first", "last", "acc")

    def __init__(self) -> None:
        self.first: list[torch.Tensor] | None = None
        self.last: list[torch.Tensor] | None = None
        self.acc: list[torch.Tensor] | None = None

    def add(self, inputs: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        if self.last is not None and any(i is not o for i, o in zip(inputs, self.last)):
            self._close()
        if self.first is None:
            self.first = inputs
        self.last = outs

    def _close(self) -> None:
        piece = [o - i for o, i in zip(self.last, self.first)]
        self.acc = piece if self.acc is None else [a.add_(p) for a, p in zip(self.acc, piece)]
        self.first = self.last = None

    def total(self) -> list[torch.Tensor]:
        self._close()
        return self.acc


class FeedForwardHook(_SlotHook):
    """Fresh tokens (one per cluster) plus propagation on cached steps."""

    def run_forward(self, args: tuple, kwargs: dict) -> Any:
        ctrl = self.controller
        branch, st, x = self._state(args, kwargs)
        if branch.full or st.n == 0 or x is None or x.shape != st.in_shape:
            # Fresh tokens edit F_0 between full steps; keep the true output for the next difference.
            keep_raw = ctrl.uses_clusters and ctrl.order > 0
            return self._compute_and_record(st, x, args, kwargs, lambda layout: keep_raw and layout is None, x)
        coeffs = ctrl.coeffs_for(st)
        clusters = self.clusters_for(x, st)
        if clusters is None:
            return self._predict(st, coeffs, x)
        rows = ctrl.fresh_rows(self.slot.group, clusters)[self.slot.group_pos]
        b, _, dim = x.shape
        xs = x.reshape(-1, dim).index_select(0, rows).view(b, -1, dim)
        if args:
            fresh = self.inner(xs, *args[1:], **kwargs)
        else:
            fresh = self.inner(**{**kwargs, "hidden_states": xs})
        self.refresh(st, fresh, rows, clusters, coeffs)
        return st.factors[0].predict(coeffs)

    def clusters_for(self, x: torch.Tensor, st: SlotState) -> GroupClusters | None:
        """This branch's clusters of the module's token group, when fresh tokens apply."""
        ctrl = self.controller
        if not ctrl.uses_clusters or st.structure is not None or not st.factors:
            return None
        clusters = ctrl.branch.clusters.get(self.slot.group)
        if clusters is None or clusters.assign.shape != x.shape[:2]:
            return None
        return clusters

    @property
    def gamma(self) -> float | None:
        """The weight fresh outputs are blended into their cluster with (image tokens, or text on
        request), or ``None`` when they are not."""
        cfg = self.controller.config
        if cfg.gamma > 0.0 and (self.slot.group == "image" or cfg.propagate_text):
            return cfg.gamma
        return None

    def refresh(self, st: SlotState, fresh: torch.Tensor, rows: torch.Tensor, clusters: GroupClusters, coeffs) -> None:
        """Fold the exact outputs of the fresh rows into ``F_0`` and count them."""
        ctrl = self.controller
        cfg = ctrl.config
        gamma = self.gamma
        write_fresh(st.factors[0], fresh, rows, clusters.flat_index if gamma is not None else None, gamma,
                    cfg.fresh_tokens, cfg.propagation == "anchored", coeffs, ctrl.branch.measure)
        ctrl.count_fresh(st, rows.numel())


class ClusterHook(compat.ModelHook):
    """k-means on the hidden states of the cluster-source block, on full steps."""

    def __init__(self, controller: ClusCaController, sources: dict, arg_positions: dict) -> None:
        super().__init__()
        self.controller = controller
        self.sources = sources
        self.arg_positions = arg_positions

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        out = self.fn_ref.original_forward(*args, **kwargs)
        ctrl = self.controller
        if ctrl.caching and ctrl.uses_clusters and ctrl.branch.full and ctrl.branch.refresh is None \
                and ctrl.config.interval > 1:
            self._cluster(args, kwargs, out)
        return out

    def _cluster(self, args: tuple, kwargs: dict, out: Any) -> None:
        ctrl = self.controller
        cfg = ctrl.config
        branch = ctrl.branch
        for group, (where, key) in self.sources.items():
            if group == "text" and not cfg.refresh_text:
                continue
            if where == "output":
                h = out if key is None else (out[key] if isinstance(out, (tuple, list)) and len(out) > key else None)
            else:
                h = get_arg(args, kwargs, key, self.arg_positions.get(key))
            if not isinstance(h, torch.Tensor) or h.ndim != 3:
                continue
            prev = branch.clusters.get(group)
            sync = h.device.type == "cuda"
            if sync:
                torch.cuda.synchronize(h.device)
            t0 = time.perf_counter()
            pair = branch.guidance_pair and h.shape[0] % 2 == 0
            src = h.detach()
            if pair:
                # One clustering per image on both halves' features: the guided output is
                # uncond + s * (cond - uncond), so a token refreshed in one half but not in the
                # other turns into an error s times as large. Same clusters, same fresh tokens.
                src = torch.cat(src.chunk(2), dim=-1)
            init = prev.centroids if prev is not None else None
            seed = mix(cfg.seed, len(group), ord(group[0]))
            masks = ctrl.token_masks
            if group == "image" and masks is not None and cfg.mask_share > 0.0:
                # Inpainting: the masks of this call's rows (one per image: a guidance pair's halves share it).
                assign, centroids, rounds = cluster_with_masks(
                    src, cfg.clusters, masks.for_batch(src.shape[0], src.shape[1]), cfg.mask_share,
                    iters=cfg.kmeans_iters, distance=cfg.kmeans_distance, init=init, seed=seed,
                    fit_per_cluster=cfg.kmeans_fit_per_cluster)
            else:
                assign, centroids, rounds = kmeans(
                    src,
                    cfg.clusters,
                    iters=cfg.kmeans_iters,
                    distance=cfg.kmeans_distance,
                    init=init,
                    seed=seed,
                    fit_tokens=cfg.kmeans_fit_per_cluster * cfg.clusters,
                    return_rounds=True,
                )
            k = centroids.shape[1]
            if pair:
                # Both halves share the assignment; one image needs no copy for that.
                assign = assign.expand(2, -1) if assign.shape[0] == 1 else assign.repeat(2, 1)
            if sync:
                torch.cuda.synchronize(h.device)
            ctrl.counters.kmeans_s += time.perf_counter() - t0
            ctrl.counters.kmeans_calls += 1
            ctrl.counters.kmeans_rounds += rounds
            new = GroupClusters(assign=assign, centroids=centroids, k=k)
            ctrl.counters.add_cache_bytes(new.nbytes() - (prev.nbytes() if prev is not None else 0))
            branch.clusters[group] = new
