"""ClusCa hooks on top of ``diffusers.hooks``: install once, activate per run.

Four hook kinds, all registered through diffusers' ``HookRegistry``:

* ``ClusCaRootHook`` on the transformer: works out which branch (cache context) and
  denoising step a call belongs to, decides full vs cached, and keeps the run counters.
* ``TaylorHook`` on attention modules: full steps record Taylor factors of the output;
  cached steps return the Taylor prediction without running the module.
* ``BlockHook`` on single-stream blocks: the same, on the block's contribution
  (output minus input), so the prediction follows the block's current input.
* ``FeedForwardHook`` on feed-forward modules: cached steps run the module on one token
  per cluster, propagate the fresh outputs to the cluster's members and return the
  Taylor prediction over the corrected factors.
* ``ClusterHook`` on the last dual-stream (or last) block: k-means on full steps.

Outside a run, or with mode ``off``, every hook calls the original forward untouched; a
mode ``off`` run goes further and points the hooked modules straight at their own forwards
until it ends, so only the root hook (which keeps the run's statistics) is on the path.
"""

from __future__ import annotations

import inspect
import math
import re
import time
from typing import Any

import torch
from diffusers.hooks.hooks import CacheContext, HookRegistry, ModelHook, StateManager

from clusca.config import ClusCaConfig
from clusca.kmeans import kmeans
from clusca.patterns import ArchitecturePatterns, find_architecture
from .state import BranchState, Counters, GroupClusters, SlotState

_ROOT_HOOK = "clusca_reference_root"
_CACHE_HOOK = "clusca_reference_cache"
_CLUSTER_HOOK = "clusca_reference_cluster"
_CONTROLLER_ATTR = "_clusca_reference_controller"
_MASK64 = (1 << 63) - 1
_PROBE_CACHE_SIZE = 64
# Bound on the fresh-token draws kept across runs: 16 bytes per (step, layer, token); a
# 50-step run of a 19-layer model with 4096 image tokens needs about 60 MiB.
_DRAW_CACHE_BYTES = 128 << 20


def _mix(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (Python's hash() is salted for str)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (int(p) & _MASK64)) * 0x100000001B3 + 0x632BE59BD9B4E019) & _MASK64
    return h


def _arg_position(fn: Any, name: str) -> int | None:
    """Positional index of parameter ``name`` of a bound forward, if it can be positional."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    for i, p in enumerate(params):
        if p.name == name and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return i
    return None


def _get_arg(args: tuple, kwargs: dict, name: str, pos: int | None) -> Any:
    if name in kwargs:
        return kwargs[name]
    if pos is not None and pos < len(args):
        return args[pos]
    return None


def _call_key(value: Any) -> Any:
    """What the FLOPs of a call can depend on: tensor shapes and dtypes, plain values, their nesting.

    Float values are left out (a timestep or a scale changes no shape), so the calls of one
    denoising loop share a key.
    """
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)):
        return tuple(_call_key(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _call_key(v)) for k, v in value.items())
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return type(value).__qualname__


def _first_value(v: Any) -> Any:
    while isinstance(v, list):
        v = v[0]
    return v


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    x = kwargs.get("hidden_states")
    return x if isinstance(x, torch.Tensor) else None


def _flatten(out: Any) -> tuple[tuple | None, list[torch.Tensor]]:
    """Split a module output into (layout, tensors); layout None means a plain tensor."""
    if isinstance(out, torch.Tensor):
        return None, [out]
    if isinstance(out, (tuple, list)):
        layout = tuple(isinstance(o, torch.Tensor) for o in out)
        if all(isinstance(o, torch.Tensor) or o is None for o in out):
            return layout, [o for o in out if o is not None]
    raise TypeError(f"ClusCa cannot cache an output of type {type(out).__name__}")


def _unflatten(layout: tuple | None, tensors: list[torch.Tensor]) -> Any:
    if layout is None:
        return tensors[0]
    it = iter(tensors)
    return tuple(next(it) if present else None for present in layout)


def _taylor(factors: list[torch.Tensor], n: int, coeffs: tuple[float, ...]) -> torch.Tensor:
    """sum_k F_k d^k / k! with precomputed coefficients; one pass per order."""
    if n <= 1:
        return factors[0].clone()
    y = torch.add(factors[0], factors[1], alpha=coeffs[1])
    for k in range(2, n):
        y.add_(factors[k], alpha=coeffs[k])
    return y


class _Slot:
    """Static description of one hooked module."""

    __slots__ = ("index", "name", "role", "group", "group_pos", "residuals", "chain_head", "chain_pos", "chain_len")

    def __init__(self, index: int, name: str, role: str, group: str | None = None, residuals=()) -> None:
        self.index = index
        self.name = name
        self.role = role  # "attention" | "block" | "feedforward" | "text"
        self.group = group
        self.group_pos = 0  # ordinal among the feed-forward modules of the same token group
        self.residuals: tuple[tuple[str, int | None], ...] = tuple(residuals)
        # Blocks predicted together: the chain's head slot holds the summed Taylor factors.
        self.chain_head = index
        self.chain_pos = 0
        self.chain_len = 1


class ClusCaController:
    """Shared by all hooks of one transformer: the active settings and the current branch."""

    def __init__(self, model: torch.nn.Module, arch: ArchitecturePatterns, slots: list[_Slot], config: ClusCaConfig):
        self.model = model
        self.arch = arch
        self.slots = slots
        self.default_config = config
        self.config = config
        self.active = False
        self.caching = False  # active and mode != off: the only flag the hot path reads
        self.uses_clusters = False
        self.gamma = 0.0
        self.order = 0
        self.branch: BranchState = BranchState(len(slots))
        self.counters = Counters()
        self.num_inference_steps: int | None = None
        self.timestep_pos = _arg_position(model.forward, "timestep")
        self.probe_targets: list[tuple[torch.nn.Module, int, str]] = []
        # Probe results by call key: the hooked modules never change, so a call with the same
        # shapes as an earlier one (the same request again) reuses its counts without hooks.
        self._probe_cache: dict[Any, tuple[list[int], list[int]]] = {}
        self.slot_modules: list[torch.nn.Module] = []  # by slot index
        self.bypass_modules: list[torch.nn.Module] = []  # every module with a cache or cluster hook
        self.group_sizes: dict[str, int] = {}
        for s in slots:
            if s.role == "feedforward":
                s.group_pos = self.group_sizes.get(s.group, 0)
                self.group_sizes[s.group] = s.group_pos + 1
        self.state_manager: StateManager | None = None  # set by the root hook
        self._gen = torch.Generator(device="cpu")
        # Fresh-token draws by (seed, step, group, shapes, device), shared by runs; see _draw.
        self._draws: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._draws_bytes = 0
        self._offsets: dict[tuple, torch.Tensor] = {}
        # Branch contexts by name: frozen, so one object per name serves every call.
        self._contexts: dict[str, CacheContext] = {}
        # (module, its hooked forward, the forward under our hooks) while a run bypasses them.
        self._bypassed: list[tuple[torch.nn.Module, Any, Any]] = []
        self._reset_step_tracking()

    # ---------------------------------------------------------------- run lifecycle
    def _reset_step_tracking(self) -> None:
        self._last_t: float | None = None
        self._step = -1
        self._seen: dict[str, int] = {}

    def reset_cache(self) -> None:
        """Drop every cached tensor and start step tracking afresh; keep the run's counters.

        Called when a new denoising loop starts inside a run: pipelines reset stateful
        hooks when they finish (``maybe_free_model_hooks``), and a timestep that goes
        up again also means a new loop.
        """
        if self.state_manager is not None:
            ctx = self.state_manager._context
            self.state_manager.reset()
            self.state_manager.set_context(ctx)
        self.branch = BranchState(len(self.slots))
        self.counters.cache_bytes = 0
        self.counters.sequences += 1
        self._reset_step_tracking()

    def reset(self) -> None:
        """Drop every cached tensor and counter (called on run entry and exit)."""
        self.counters = Counters()
        self.reset_cache()

    def start(self, config: ClusCaConfig, num_inference_steps: int | None) -> None:
        self.reset()
        self.config = config
        self.num_inference_steps = num_inference_steps
        self.order = config.effective_order
        self.uses_clusters = config.uses_clusters
        self.gamma = float(config.gamma)
        self.caching = config.enabled
        self.active = True
        if not self.caching:
            self._bypass_module_hooks()

    def stop(self) -> None:
        self._restore_module_hooks()
        self.active = False
        self.caching = False
        self.reset()

    def _bypass_module_hooks(self) -> None:
        """Mode ``off``: point each hooked module straight at the forward under our hooks for the run.

        Those hooks would only pass the call through, but the hook chain is several Python
        calls per module and call; the root hook alone keeps the run's statistics. A module
        whose outermost hook is not ours keeps its chain, since bypassing ours would skip
        the others too.
        """
        ours = (_CACHE_HOOK, _CLUSTER_HOOK)
        for mod in self.bypass_modules:
            registry = mod.__dict__.get("_diffusers_hook")
            hooked = mod.__dict__.get("forward")
            if registry is None or hooked is None or not registry._hook_order:
                continue
            first = len(registry._hook_order)
            while first > 0 and registry._hook_order[first - 1] in ours:
                first -= 1
            if first == len(registry._hook_order):
                continue
            inner = registry._fn_refs[first].original_forward
            if inner is None:
                continue
            mod.forward = inner
            self._bypassed.append((mod, hooked, inner))

    def _restore_module_hooks(self) -> None:
        for mod, hooked, inner in self._bypassed:
            if mod.__dict__.get("forward") is inner:
                mod.forward = hooked
        self._bypassed = []

    # ---------------------------------------------------------------- per call
    def begin_call(self, args: tuple, kwargs: dict) -> None:
        sm = self.state_manager
        ctx = sm._context
        step = None
        if ctx is not None and ctx.step_index is not None:
            step = int(ctx.step_index)
            if step != self._step:
                self._step, self._seen = step, {}
        else:
            t = _get_arg(args, kwargs, "timestep", self.timestep_pos)
            if isinstance(t, torch.Tensor) and t.numel() > 0:
                # One host read per transformer call (not per module): a new timestep value
                # starts a new denoising step, repeated values are further branches of it.
                # tolist() is one dispatch where indexing then reading is three, which shows
                # on the per-step cost of small models.
                tv = float(_first_value(t.tolist()) if t.numel() <= 64 else t.reshape(-1)[0])
            elif isinstance(t, (int, float)):
                tv = float(t)
            else:
                tv = None
            if tv is not None:
                if self._last_t is not None and tv > self._last_t:
                    # Timesteps only decrease within a denoising loop: this is a new one.
                    self.reset_cache()
                if tv != self._last_t:
                    self._step += 1
                    self._seen = {}
                    self._last_t = tv
                step = self._step
        # Branch key: the cache context's name ("cond", "uncond", ...) or "call"; a name
        # seen again within the same step (guidance as two plain calls) is a new branch.
        name = ctx.name if ctx is not None else "call"
        key = name
        if step is not None:
            repeat = self._seen.get(name, 0)
            self._seen[name] = repeat + 1
            if repeat:
                key = f"{name}#{repeat}"
        if ctx is None or ctx.name != key:
            context = self._contexts.get(key)
            if context is None:
                context = self._contexts[key] = CacheContext(key)
            sm.set_context(context)
            branch = sm.get_state()
            sm.set_context(ctx)
        else:
            branch = sm.get_state()
        if step is None:
            step = branch.calls
        branch.calls += 1

        x = _first_tensor(args, kwargs)
        signature = (tuple(x.shape), x.dtype, x.device) if x is not None else None
        if branch.signature != signature or step <= branch.step:
            # New shape or a step index that went backwards: a new sequence in this branch.
            if branch.signature is not None:
                self._drop_branch_tensors(branch)
            branch.signature = signature
            branch.last_full = -1
        branch.step = step
        cfg = self.config
        full = (not self.caching) or branch.last_full < 0 or cfg.is_full_step(step)
        branch.full = full
        # Classifier-free guidance in one call feeds the same latents twice: detect it once per
        # full step so that k-means can give both halves of an image the same clusters.
        branch.guidance_pair = bool(
            full and self.uses_clusters and cfg.guidance_pairs and x is not None and x.ndim >= 2
            and x.shape[0] % 2 == 0 and torch.equal(x[: x.shape[0] // 2], x[x.shape[0] // 2:])
        )
        if not full:
            d = step - branch.last_full
            branch.coeffs = tuple(d**k / math.factorial(k) for k in range(self.order + 1))
        self.branch = branch
        if not branch.probed:
            self._probe_begin(branch, args, kwargs)

    def end_call(self) -> None:
        branch = self.branch
        c = self.counters
        if branch.probed is None:
            self._probe_end(branch)
        c.calls += 1
        tokens = sum(branch.slots[s.index].tokens for s in self.slots)
        c.tokens_uncached += tokens
        c.flops_uncached += branch.flops_call
        key = (c.sequences, branch.step)
        if branch.full:
            c.full_steps.add(key)
            c.tokens_computed += tokens
            c.flops += branch.flops_call
            branch.last_full = branch.step
        else:
            c.cached_steps.add(key)
            c.flops += branch.flops_unhooked

    def _drop_branch_tensors(self, branch: BranchState) -> None:
        freed = sum(st.nbytes() for st in branch.slots) + sum(g.nbytes() for g in branch.clusters.values())
        self.counters.add_cache_bytes(-freed)
        branch.slots = [SlotState() for _ in self.slots]
        branch.clusters = {}
        branch.fresh = {}
        branch.fresh_ahead = {}
        branch.chain_acc = {}
        branch.probed = False

    # ---------------------------------------------------------------- FLOPs probe
    def _probe_begin(self, branch: BranchState, args: tuple, kwargs: dict) -> None:
        """Count analytic FLOPs of this (full) call with temporary torch hooks, or reuse the counts
        of an earlier call with the same key."""
        key = (_call_key(args), _call_key(kwargs))
        known = self._probe_cache.get(key)
        if known is not None:
            self._set_probe_counts(branch, *known)
            return
        flops = [0] * (len(self.slots) + 1)  # last entry: outside any hooked module
        handles = []

        def linear_hook(owner: int):
            def hook(mod, inputs, output):
                x = inputs[0] if inputs else None
                if isinstance(x, torch.Tensor) and x.shape[-1] == mod.in_features:
                    flops[owner] += 2 * mod.in_features * mod.out_features * (x.numel() // mod.in_features)

            return hook

        def conv_hook(owner: int):
            def hook(mod, inputs, output):
                if isinstance(output, torch.Tensor):
                    k = math.prod(mod.kernel_size) * (mod.in_channels // mod.groups)
                    flops[owner] += 2 * k * output.numel()

            return hook

        def attention_hook(owner: int):
            def hook(mod, args, kwargs):
                hs = kwargs.get("hidden_states", args[0] if args else None)
                ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
                if not isinstance(hs, torch.Tensor):
                    return
                b = hs.shape[0]
                nq = hs.numel() // (b * hs.shape[-1])
                inner = mod.to_q.out_features if hasattr(mod, "to_q") else hs.shape[-1]
                if isinstance(ehs, torch.Tensor):
                    nt = ehs.numel() // (b * ehs.shape[-1])
                    if getattr(mod, "add_k_proj", None) is not None and getattr(mod, "added_kv_proj_dim", 0):
                        nq = nk = nq + nt  # joint attention over image and text tokens
                    else:
                        nk = nt  # cross-attention
                else:
                    nk = nq
                # Q K^T and attention @ V: 2 multiply-adds each per (query, key, channel).
                flops[owner] += 4 * b * nq * nk * inner

            return hook

        tokens = [0] * len(self.slots)

        def slot_hook(slot: _Slot):
            # Token count of an uncached call, known even when the hooks pass through (mode off).
            names = [name for name, _ in slot.residuals] if slot.role == "block" else ["hidden_states"]
            positions = [pos for _, pos in slot.residuals] if slot.role == "block" else [0]

            def hook(mod, args, kwargs):
                total = 0
                for name, pos in zip(names, positions):
                    t = _get_arg(args, kwargs, name, pos)
                    if isinstance(t, torch.Tensor) and t.ndim >= 2:
                        total += t.numel() // t.shape[-1]
                tokens[slot.index] = total

            return hook

        for slot in self.slots:
            mod = self.slot_modules[slot.index]
            handles.append(mod.register_forward_pre_hook(slot_hook(slot), with_kwargs=True))
        for mod, owner, kind in self.probe_targets:
            if kind == "linear":
                handles.append(mod.register_forward_hook(linear_hook(owner)))
            elif kind == "conv":
                handles.append(mod.register_forward_hook(conv_hook(owner)))
            else:
                handles.append(mod.register_forward_pre_hook(attention_hook(owner), with_kwargs=True))
        self._probe = (flops, tokens, handles, key)
        branch.probed = None  # marks "probe running" for end_call

    def _probe_end(self, branch: BranchState, completed: bool = True) -> None:
        flops, tokens, handles, key = self._probe
        for h in handles:
            h.remove()
        self._probe = None
        if completed:  # a call that raised may not have reached every module
            if len(self._probe_cache) >= _PROBE_CACHE_SIZE:
                self._probe_cache.pop(next(iter(self._probe_cache)))
            self._probe_cache[key] = (flops, tokens)
        self._set_probe_counts(branch, flops, tokens)

    def _set_probe_counts(self, branch: BranchState, flops: list[int], tokens: list[int]) -> None:
        for s in self.slots:
            branch.slots[s.index].flops = flops[s.index]
            branch.slots[s.index].tokens = tokens[s.index]
        branch.flops_call = sum(flops)
        branch.flops_unhooked = flops[-1]
        branch.probed = True

    # ---------------------------------------------------------------- cache bookkeeping
    def record(self, st: SlotState, tensors: list[torch.Tensor], keep_raw: bool) -> None:
        """Full step: fold the module's true output into the Taylor factors."""
        step = self.branch.step
        before = st.nbytes()
        if st.factors is None or len(st.factors) != len(tensors) or st.last_full < 0:
            st.factors = [[t.detach().clone()] for t in tensors]
            st.n = 1
        else:
            d = step - st.last_full
            grow = self.order > 0 and d > 0
            new_factors = []
            for j, t in enumerate(tensors):
                old = st.factors[j]
                prev0 = st.raw0[j] if (st.raw0 is not None and j < len(st.raw0)) else old[0]
                new = [t.detach().clone()]
                if grow:
                    olds = [prev0, *old[1:]]
                    for k in range(min(st.n, self.order)):
                        new.append((new[k] - olds[k]).div_(d))
                new_factors.append(new)
            st.factors = new_factors
            st.n = min(st.n + 1, self.order + 1) if grow else 1
        st.raw0 = [f[0].clone() for f in st.factors] if keep_raw else None
        st.last_full = step
        self.counters.add_cache_bytes(st.nbytes() - before)

    def coeffs_for(self, st: SlotState) -> tuple[float, ...]:
        branch = self.branch
        if st.last_full == branch.last_full:
            return branch.coeffs
        d = branch.step - st.last_full
        return tuple(d**k / math.factorial(k) for k in range(self.order + 1))

    def fresh_rows(self, group: str, clusters: GroupClusters, layer: int, f: int) -> torch.Tensor:
        """Rows (in the flattened ``(batch * tokens)`` layout) recomputed this step by the
        ``layer``-th feed-forward module of ``group``: ``(batch * k * f,)``, cluster-major.

        One random score per (step, layer, token position), shared by the whole batch, drawn
        from a generator seeded by (seed, step, group); each sample takes, per cluster, its
        member(s) with the highest score, so a sample's choice never depends on the other
        samples in its batch. The picks of all layers of a group and of every cached step up
        to the next full step are made at once, on the first cached call after a clustering:
        per module and step that leaves one lookup.
        """
        branch = self.branch
        step = branch.step
        cached = branch.fresh.get(group)
        if cached is not None and cached[0] == step and cached[1] is clusters:
            return cached[2][layer]
        ahead = branch.fresh_ahead.get(group)
        if ahead is None or ahead[0] is not clusters or step not in ahead[1]:
            ahead = (clusters, self._pick_rows(group, clusters, self._cached_run(step), f))
            branch.fresh_ahead[group] = ahead
        rows = ahead[1][step]
        branch.fresh[group] = (step, clusters, rows)
        return rows[layer]

    def _cached_run(self, step: int) -> tuple[int, ...]:
        """``step`` and the cached steps that follow it, up to the next full step."""
        cfg = self.config
        total = self.num_inference_steps
        steps = [step]
        s = step + 1
        while len(steps) < cfg.interval and not cfg.is_full_step(s) and (total is None or s < total):
            steps.append(s)
            s += 1
        return tuple(steps)

    def _pick_rows(self, group: str, clusters: GroupClusters, steps: tuple[int, ...], f: int) -> dict[int, torch.Tensor]:
        """Fresh rows of every layer of ``group`` for each of ``steps``: ``{step: (layers, b * k * f)}``."""
        assign = clusters.assign
        b, n = assign.shape
        k = clusters.k
        layers = self.group_sizes[group]
        dev = assign.device
        order, rank = self._draw(steps, group, layers, n, dev)  # (steps * layers, n)
        m = order.shape[0]
        offsets = self._row_offsets(b, n, dev)  # (1, b, 1): first row of each sample
        rank = rank.unsqueeze(1).expand(m, b, n)
        assign_l = assign.unsqueeze(0).expand(m, b, n)
        best = torch.full((m, b, k), -1, dtype=rank.dtype, device=dev)
        best.scatter_reduce_(2, assign_l, rank, reduce="amax", include_self=True)
        if f == 1:
            # An empty cluster (-1) gets an arbitrary token: its exact output is still valid.
            tokens = order.gather(1, best.clamp_min_(0).view(m, b * k)).view(m, b, k)
        else:
            picks = [best]
            for _ in range(f - 1):
                rank = rank.masked_fill(rank.eq(best.gather(2, assign_l)), -1)
                best = torch.full((m, b, k), -1, dtype=rank.dtype, device=dev)
                best.scatter_reduce_(2, assign_l, rank, reduce="amax", include_self=True)
                picks.append(best)
            stacked = torch.stack(picks, dim=3)  # (m, b, k, f)
            # A cluster with fewer than f members repeats its first pick.
            stacked = torch.where(stacked < 0, stacked[..., :1], stacked)
            tokens = order.gather(1, stacked.clamp_min(0).reshape(m, -1)).reshape(m, b, k * f)
        rows = tokens.add_(offsets).view(len(steps), layers, -1)
        return {s: rows[i] for i, s in enumerate(steps)}

    def _draw(self, steps: tuple[int, ...], group: str, layers: int, n: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token order by random score, and each token's rank in it: ``(steps * layers, n)`` each.

        They depend on the seed, the steps and the shapes only, never on the features, so
        they are kept across runs: a service repeats the same steps for every request, and
        on an accelerator this also saves a host-to-device copy per cached step.
        """
        seed = self.config.seed
        key = (seed, steps, group, layers, n, dev)
        hit = self._draws.get(key)
        if hit is not None:
            return hit
        orders = []
        for step in steps:
            self._gen.manual_seed(_mix(seed, step, len(group), ord(group[0])))
            orders.append(torch.rand(layers, n, generator=self._gen).argsort(dim=1))  # tokens by score
        order = torch.cat(orders) if len(orders) > 1 else orders[0]
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n).expand(order.shape[0], n))
        drawn = (order.to(dev), rank.to(dev))
        size = 2 * order.numel() * order.element_size()
        while self._draws and self._draws_bytes + size > _DRAW_CACHE_BYTES:
            old = self._draws.pop(next(iter(self._draws)))
            self._draws_bytes -= 2 * old[0].numel() * old[0].element_size()
        if size <= _DRAW_CACHE_BYTES:
            self._draws[key] = drawn
            self._draws_bytes += size
        return drawn

    def _row_offsets(self, b: int, n: int, dev: torch.device) -> torch.Tensor:
        key = (b, n, dev)
        off = self._offsets.get(key)
        if off is None:
            if len(self._offsets) >= _PROBE_CACHE_SIZE:
                self._offsets.pop(next(iter(self._offsets)))
            off = self._offsets[key] = (torch.arange(b, device=dev) * n).view(1, b, 1)
        return off


# ==================================================================== hooks
class ClusCaRootHook(ModelHook):
    """Top-level hook: branch and step bookkeeping for the whole transformer."""

    _is_stateful = True

    def __init__(self, controller: ClusCaController) -> None:
        super().__init__()
        self.controller = controller
        # diffusers' cache_context("cond"/"uncond") sets this manager's context; calls
        # without one get a context named after their position within the timestep.
        self.state_manager = StateManager(BranchState, (len(controller.slots),))
        controller.state_manager = self.state_manager

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        ctrl = self.controller
        if not ctrl.active:
            return self.fn_ref.original_forward(*args, **kwargs)
        ctrl.begin_call(args, kwargs)
        try:
            out = self.fn_ref.original_forward(*args, **kwargs)
        except BaseException:
            if ctrl.branch.probed is None:
                ctrl._probe_end(ctrl.branch, completed=False)
            raise
        ctrl.end_call()
        return out

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        # Pipelines call this when they finish; the run's statistics must survive it.
        self.controller.reset_cache()
        return module


class _SlotHook(ModelHook):
    def __init__(self, controller: ClusCaController, slot: _Slot) -> None:
        super().__init__()
        self.controller = controller
        self.slot = slot
        self.index = slot.index

    def _state(self, args: tuple, kwargs: dict) -> tuple[BranchState, SlotState, torch.Tensor | None]:
        """This call's branch, this module's cache in it, and the module's first input tensor."""
        branch = self.controller.branch
        return branch, branch.slots[self.index], _first_tensor(args, kwargs)


class TaylorHook(_SlotHook):
    """Predict the whole output of a module (attention) on cached steps."""

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        ctrl = self.controller
        if not ctrl.caching:
            return self.fn_ref.original_forward(*args, **kwargs)
        branch, st, x = self._state(args, kwargs)
        if branch.full or st.n == 0 or (x is not None and x.shape != st.in_shape):
            out = self.fn_ref.original_forward(*args, **kwargs)
            layout, tensors = _flatten(out)
            st.structure = layout
            st.in_shape = x.shape if x is not None else None
            st.tokens = x.numel() // x.shape[-1] if x is not None else 0
            ctrl.record(st, tensors, keep_raw=False)
            return out
        coeffs = ctrl.coeffs_for(st)
        return _unflatten(st.structure, [_taylor(fs, st.n, coeffs) for fs in st.factors])


class TextStreamHook(_SlotHook):
    """Text half of a dual-stream block: on cached steps, return the last full step's output.

    What such a module computes on a cached step reaches only predicted modules or the
    dropped text tokens (see ``ArchitecturePatterns.text_stream``), so any finite value of
    the right shape gives the same result. An output shaped like the module's input (the
    normalised text tokens) is answered with that input, so nothing of text-token size is
    kept; the other outputs (per-sample gates and shifts) are kept as they are.
    """

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        ctrl = self.controller
        if not ctrl.caching:
            return self.fn_ref.original_forward(*args, **kwargs)
        branch, st, x = self._state(args, kwargs)
        stale = st.n == 0 or (x is not None and x.shape != st.in_shape)
        if branch.full or stale or ctrl.config.refresh_text:
            out = self.fn_ref.original_forward(*args, **kwargs)
            if branch.full or stale:
                layout, tensors = _flatten(out)
                before = st.nbytes()
                # An empty factor list stands for "the current input".
                st.factors = [[] if x is not None and t.shape == x.shape else [t] for t in tensors]
                st.n, st.structure = 1, layout
                st.in_shape = x.shape if x is not None else None
                st.last_full = branch.step
                ctrl.counters.add_cache_bytes(st.nbytes() - before)
            if not branch.full:
                c = ctrl.counters
                c.tokens_computed += st.tokens
                c.flops += st.flops
            return out
        return _unflatten(st.structure, [fs[0] if fs else x for fs in st.factors])


class BlockHook(_SlotHook):
    """Predict a block's contribution (output minus input) on cached steps.

    Consecutive blocks of a chain are predicted together: the contributions add up, so
    the head block returns ``input + sum of predicted contributions`` and the others pass
    their inputs through. Same result as block-by-block prediction (Taylor prediction is
    linear in the cached values), with one pass over the tokens instead of one per block.
    """

    def _inputs(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        return [_get_arg(args, kwargs, name, pos) for name, pos in self.slot.residuals]

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        ctrl = self.controller
        if not ctrl.caching:
            return self.fn_ref.original_forward(*args, **kwargs)
        slot = self.slot
        branch = ctrl.branch
        st = branch.slots[self.index]
        head = branch.slots[slot.chain_head]
        inputs = self._inputs(args, kwargs)
        x = inputs[-1] if inputs else None
        if branch.full or head.n == 0 or (x is not None and x.shape != st.in_shape):
            return self._compute(args, kwargs, branch, st, head, inputs, x)
        if slot.chain_pos > 0:
            return _unflatten(st.structure, inputs)
        coeffs = ctrl.coeffs_for(head)
        preds = []
        for fs, inp in zip(head.factors, inputs):
            y = torch.add(inp, fs[0])
            for k in range(1, head.n):
                y.add_(fs[k], alpha=coeffs[k])
            preds.append(y)
        return _unflatten(st.structure, preds)

    def _compute(self, args, kwargs, branch: BranchState, st: SlotState, head: SlotState, inputs, x) -> Any:
        slot = self.slot
        out = self.fn_ref.original_forward(*args, **kwargs)
        layout, outs = _flatten(out)
        if len(outs) != len(inputs) or any(i is None for i in inputs):
            raise TypeError(f"{slot.name}: block outputs do not match the residual inputs {slot.residuals}")
        st.structure = layout
        st.in_shape = x.shape if x is not None else None
        st.tokens = sum(i.numel() // i.shape[-1] for i in inputs)
        acc = branch.chain_acc.get(slot.chain_head)
        if slot.chain_pos == 0 or acc is None:
            acc = [o - i for o, i in zip(outs, inputs)]
            branch.chain_acc[slot.chain_head] = acc
        else:
            for a, o, i in zip(acc, outs, inputs):
                a.add_(o).sub_(i)
        if slot.chain_pos == slot.chain_len - 1:
            head.structure = layout
            self.controller.record(head, acc, keep_raw=False)
            del branch.chain_acc[slot.chain_head]
        return out


class FeedForwardHook(_SlotHook):
    """Fresh tokens (one per cluster) plus propagation on cached steps."""

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        ctrl = self.controller
        if not ctrl.caching:
            return self.fn_ref.original_forward(*args, **kwargs)
        branch, st, x = self._state(args, kwargs)
        if branch.full or st.n == 0 or x is None or x.shape != st.in_shape:
            out = self.fn_ref.original_forward(*args, **kwargs)
            layout, tensors = _flatten(out)
            st.structure = layout
            st.in_shape = x.shape if x is not None else None
            st.tokens = x.numel() // x.shape[-1] if x is not None else 0
            keep_raw = ctrl.uses_clusters and ctrl.order > 0 and layout is None
            ctrl.record(st, tensors, keep_raw=keep_raw)
            return out
        coeffs = ctrl.coeffs_for(st)
        clusters = branch.clusters.get(self.slot.group) if ctrl.uses_clusters else None
        if clusters is None or st.structure is not None or clusters.assign.shape != x.shape[:2]:
            return _unflatten(st.structure, [_taylor(fs, st.n, coeffs) for fs in st.factors])
        return self._fresh(module, x, args, kwargs, st, clusters, coeffs)

    def _fresh(self, module, x, args, kwargs, st: SlotState, clusters: GroupClusters, coeffs) -> torch.Tensor:
        ctrl = self.controller
        cfg = ctrl.config
        f = cfg.fresh_tokens
        b, _, dim = x.shape
        rows = ctrl.fresh_rows(self.slot.group, clusters, self.slot.group_pos, f)  # (b*k*f,)
        xs = x.reshape(-1, dim).index_select(0, rows).view(b, -1, dim)
        if args:
            fresh = self.fn_ref.original_forward(xs, *args[1:], **kwargs)
        else:
            fresh = self.fn_ref.original_forward(**{**kwargs, "hidden_states": xs})
        fs = st.factors[0]
        f0 = fs[0]
        dout = fresh.shape[-1]
        fresh = fresh.to(f0.dtype)
        if ctrl.gamma > 0.0 and (self.slot.group == "image" or cfg.propagate_text):
            mean = fresh if f == 1 else fresh.view(b, clusters.k, f, dout).mean(2)
            # F0 <- (1 - gamma) F0 + gamma * fresh(cluster of token). A row gather plus an
            # in-place lerp is about twice as fast on CPU as the equivalent one-hot bmm.
            target = mean.reshape(b * clusters.k, dout).index_select(0, clusters.flat_index)
            f0.lerp_(target.view_as(f0), ctrl.gamma)
        flat0 = f0.view(-1, dout)
        fresh_rows = fresh.reshape(-1, dout)
        if cfg.propagation == "anchored" and st.n > 1:
            # Store the fresh value so that the Taylor sum returns it exactly at its token.
            fresh_rows = fresh_rows.clone()
            for k in range(1, st.n):
                fresh_rows.sub_(fs[k].view(-1, dout).index_select(0, rows), alpha=coeffs[k])
        flat0.index_copy_(0, rows, fresh_rows)
        c = ctrl.counters
        n_fresh = rows.numel()
        c.tokens_computed += n_fresh
        if st.tokens:
            c.flops += st.flops * n_fresh // st.tokens
        return _taylor(fs, st.n, coeffs)


class ClusterHook(ModelHook):
    """k-means on the hidden states of the cluster-source block, on full steps."""

    def __init__(self, controller: ClusCaController, sources: dict, arg_positions: dict) -> None:
        super().__init__()
        self.controller = controller
        self.sources = sources
        self.arg_positions = arg_positions

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        out = self.fn_ref.original_forward(*args, **kwargs)
        ctrl = self.controller
        if ctrl.caching and ctrl.uses_clusters and ctrl.branch.full and ctrl.config.interval > 1:
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
                h = _get_arg(args, kwargs, key, self.arg_positions.get(key))
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
            assign, centroids, rounds = kmeans(
                src,
                cfg.clusters,
                iters=cfg.kmeans_iters,
                distance=cfg.kmeans_distance,
                init=prev.centroids if prev is not None else None,
                seed=_mix(cfg.seed, len(group), ord(group[0])),
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


# ==================================================================== apply / remove
def _match(patterns, name: str) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def _plan(model: torch.nn.Module, arch: ArchitecturePatterns) -> tuple[list[_Slot], list[tuple[str, torch.nn.Module]], str | None]:
    slots: list[_Slot] = []
    modules: list[tuple[str, torch.nn.Module]] = []
    taken: list[str] = []
    cluster_name = None
    for name, mod in model.named_modules():
        if not name:
            continue
        if arch.cluster_module and re.fullmatch(arch.cluster_module, name):
            cluster_name = name  # the last match wins
        if any(name.startswith(t + ".") for t in taken):
            continue  # already covered by an enclosing cached module
        role = group = None
        residuals: list = []
        if _match(arch.blocks, name):
            role = "block"
            residuals = [(r, _arg_position(mod.forward, r)) for r in arch.block_residuals]
        elif _match(arch.attention, name):
            role = "attention"
        elif _match(arch.text_stream, name):
            role = "text"
        else:
            for pat, grp in arch.feedforward.items():
                if re.fullmatch(pat, name):
                    role, group = "feedforward", grp
                    break
        if role is None:
            continue
        slots.append(_Slot(len(slots), name, role, group, residuals))
        modules.append((name, mod))
        taken.append(name)
    if arch.chain_blocks:
        _link_chains(slots)
    return slots, modules, cluster_name


def _link_chains(slots: list[_Slot]) -> None:
    """Group consecutive block slots with the same parent (e.g. one ModuleList) into chains."""
    chain: list[_Slot] = []

    def close() -> None:
        for pos, s in enumerate(chain):
            s.chain_head, s.chain_pos, s.chain_len = chain[0].index, pos, len(chain)
        chain.clear()

    for s in slots:
        if s.role != "block":
            close()
            continue
        if chain and chain[-1].name.rsplit(".", 1)[0] != s.name.rsplit(".", 1)[0]:
            close()
        chain.append(s)
    close()


def is_clusca_applied(model: torch.nn.Module) -> bool:
    return model.__dict__.get(_CONTROLLER_ATTR) is not None


def get_controller(model: torch.nn.Module) -> ClusCaController | None:
    return model.__dict__.get(_CONTROLLER_ATTR)


def apply_clusca(
    model: torch.nn.Module,
    config: ClusCaConfig | None = None,
    *,
    architecture: ArchitecturePatterns | None = None,
) -> ClusCaController:
    """Install the ClusCa hooks on a diffusers transformer (inactive until ``clusca_run``).

    ``config`` becomes the default settings of runs that pass none; its ``modules`` field
    (if set) overrides the architecture's module patterns. Calling it again with other
    patterns re-installs the hooks; with the same patterns it only updates the defaults.
    """
    config = (config if config is not None else ClusCaConfig()).validate()
    base_arch = architecture or find_architecture(model)
    arch = base_arch.with_overrides(config.modules)
    existing = get_controller(model)
    if existing is not None:
        if existing.arch == arch:
            existing.default_config = config
            return existing
        remove_clusca(model)
    slots, modules, cluster_name = _plan(model, arch)
    if not slots:
        raise ValueError(f"modules: no module of {type(model).__name__} matches the ClusCa patterns")
    ctrl = ClusCaController(model, arch, slots, config)
    ctrl.base_arch = base_arch
    ctrl.slot_modules = [mod for _, mod in modules]
    ctrl.bypass_modules = list(ctrl.slot_modules)

    # FLOPs probe targets, each attributed to the hooked module that contains it.
    owners = [(s.name, s.index) for s in slots]
    for name, mod in model.named_modules():
        owner = len(slots)
        for prefix, idx in owners:
            if name == prefix or name.startswith(prefix + "."):
                owner = idx
                break
        if isinstance(mod, torch.nn.Linear):
            ctrl.probe_targets.append((mod, owner, "linear"))
        elif isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            ctrl.probe_targets.append((mod, owner, "conv"))
        elif hasattr(mod, "processor") and hasattr(mod, "to_q"):
            ctrl.probe_targets.append((mod, owner, "attention"))

    HookRegistry.check_if_exists_or_initialize(model).register_hook(ClusCaRootHook(ctrl), _ROOT_HOOK)
    hook_cls = {"attention": TaylorHook, "block": BlockHook, "feedforward": FeedForwardHook, "text": TextStreamHook}
    for slot, (_, mod) in zip(slots, modules):
        registry = HookRegistry.check_if_exists_or_initialize(mod)
        registry.register_hook(hook_cls[slot.role](ctrl, slot), _CACHE_HOOK)
    if cluster_name is not None and arch.cluster_sources:
        mod = model.get_submodule(cluster_name)
        positions = {
            key: _arg_position(mod.forward, key) for where, key in arch.cluster_sources.values() if where == "input"
        }
        HookRegistry.check_if_exists_or_initialize(mod).register_hook(
            ClusterHook(ctrl, dict(arch.cluster_sources), positions), _CLUSTER_HOOK
        )
        if all(mod is not m for m in ctrl.bypass_modules):
            ctrl.bypass_modules.append(mod)
    model._diffusers_hook.invalidate_child_registries_cache()
    model.__dict__[_CONTROLLER_ATTR] = ctrl
    return ctrl


def remove_clusca(model: torch.nn.Module) -> None:
    """Remove every ClusCa hook; the model behaves exactly as before ``apply_clusca``."""
    ctrl = get_controller(model)
    if ctrl is None:
        return
    if ctrl.active:
        raise RuntimeError("remove_clusca: a ClusCa run is active on this model; leave the clusca_run block first")
    registry = HookRegistry.check_if_exists_or_initialize(model)
    for name in (_CLUSTER_HOOK, _CACHE_HOOK, _ROOT_HOOK):
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()
    ctrl.reset()
    del model.__dict__[_CONTROLLER_ATTR]
