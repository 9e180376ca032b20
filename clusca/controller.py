"""The controller shared by all hooks of one transformer: the run's lifecycle and each call's
full/cached decision. Step detection, the FLOPs probe, fresh-token picks and the Taylor math
live in their own modules; this one wires them together."""

from __future__ import annotations

from typing import Any

import torch

from . import capture, guard, recompute
from .calls import device_of, first_tensor
from .config import ClusCaConfig
from .diffusers_compat import StateManager, current_context, forward_under
from .fresh import FreshTokens
from .patterns import ArchitecturePatterns
from .probe import FlopsProbe
from .state import BranchState, Counters, SlotState
from .steps import StepTracker
from .taylor import coefficients as prediction_weights

CACHE_HOOK = "clusca_cache"
CLUSTER_HOOK = "clusca_cluster"
ROOT_HOOK = "clusca_root"


class Slot:
    """Static description of one hooked module."""

    __slots__ = ("index", "name", "role", "group", "group_pos", "residuals", "chain_head", "chain_pos", "chain_len",
                 "text_pos")

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
        # Position of the output that is text tokens (see ArchitecturePatterns.text_outputs).
        self.text_pos: int | None = None


class ClusCaController:
    """The active settings, the current branch, the run's counters."""

    def __init__(self, model: torch.nn.Module, arch: ArchitecturePatterns, slots: list[Slot],
                 slot_modules: list[torch.nn.Module], config: ClusCaConfig) -> None:
        self.model = model
        self.arch = arch
        self.base_arch = arch
        self.slots = slots
        self.slot_modules = slot_modules  # by slot index
        self.bypass_modules: list[torch.nn.Module] = list(slot_modules)  # every module with a cache or cluster hook
        self.default_config = config
        self.config = config
        self.active = False
        self.caching = False  # active and mode != off: the only flag the hot path reads
        self.uses_clusters = False
        self.text_dead = False  # this run's text outputs get no factors (ArchitecturePatterns.text_outputs)
        self.order = 0
        self.num_inference_steps: int | None = None
        self.layout_steps = 0  # leading steps the divergence guard runs in full (clusca.guard)
        self.branch = BranchState(len(slots))
        self.counters = Counters()
        self.group_sizes: dict[str, int] = {}
        for s in slots:
            if s.role == "feedforward":
                s.group_pos = self.group_sizes.get(s.group, 0)
                self.group_sizes[s.group] = s.group_pos + 1
        self.steps = StepTracker(model)
        self.probe = FlopsProbe(model, slots, slot_modules)
        self.fresh = FreshTokens(self.group_sizes)
        self.token_masks = None  # this run's inpainting masks per sample (clusca.masking.TokenMasks)
        self.adapter = None  # the architecture's lean cached step, if it has one (clusca.adapters)
        # Cache buffers and recorded cached steps kept between runs while capture is on.
        self.kept = capture.KeptSteps()
        self.keeping = False
        self._settings_key: str = ""
        self.state_manager: StateManager | None = None  # set by the root hook
        # The context-parallel group the model's calls are split over (clusca.parallel), or None.
        self.parallel = None
        # (module, its hooked forward, the forward under our hooks) while a run bypasses them.
        self._bypassed: list[tuple[torch.nn.Module, Any, Any]] = []

    # ---------------------------------------------------------------- run lifecycle
    def start(self, config: ClusCaConfig, num_inference_steps: int | None) -> None:
        self.reset()
        self.token_masks = None
        self.config = config
        self.num_inference_steps = num_inference_steps
        self.layout_steps = guard.layout_steps(num_inference_steps, config.guard_layout) if config.guard else 0
        from .parallel import parallel_group

        self.parallel = parallel_group(self.model)
        self.order = config.effective_order
        self.uses_clusters = config.uses_clusters
        self.text_dead = bool(self.arch.text_stream and self.arch.text_outputs) and not config.refresh_text
        self.caching = config.enabled
        # Whether cached steps are recorded is settled once per run, off the hot path.
        self.keeping = False
        if self.caching and config.capture == "auto" and self.adapter is not None:
            missing = capture.backend().unavailable(device_of(self.model))
            if missing is None and self.parallel is not None:
                # A recorded step would replay the gather's collective outside the group's order.
                missing = 'not under context parallelism'
            self.counters.capture_unavailable = missing
            self.keeping = missing is None
        if self.keeping:
            self.kept.begin_run(self.model)
            self._settings_key = repr(sorted((k, v) for k, v in config.to_dict().items() if k != "seed"))
        self.active = True
        if not self.caching:
            self._bypass_module_hooks(self.bypass_modules)
        elif self.adapter is not None and self.text_dead:
            # The lean cached step never calls the text stream, and the text stream is dead:
            # its hooks would only bookkeep on full steps. Should a cached call fall back to
            # the module hooks, these modules compute their real outputs, which reach nothing.
            self._bypass_module_hooks([self.slot_modules[s.index] for s in self.slots
                                       if s.role == "text" or (s.role == "feedforward" and s.group == "text")])

    def stop(self) -> None:
        if self.keeping:
            self.kept.end_run()
            self.keeping = False
        self._restore_module_hooks()
        self.active = False
        self.caching = False
        self.token_masks = None
        self.reset()

    def reset(self) -> None:
        """Drop every cached tensor and counter (called on run entry and exit)."""
        self.counters = Counters()
        self.reset_cache()

    def reset_cache(self) -> None:
        """Drop every cached tensor and start step tracking afresh; keep the run's counters.

        Called when a new denoising loop starts inside a run: pipelines reset stateful
        hooks when they finish (``maybe_free_model_hooks``), and a timestep that goes
        up again also means a new loop.
        """
        if self.state_manager is not None:
            ctx = current_context(self.state_manager)
            self.state_manager.reset()
            self.state_manager.set_context(ctx)
        self.branch = BranchState(len(self.slots))
        self.counters.cache_bytes = 0
        self.counters.sequences += 1
        self.steps.reset()

    def announce_step(self, step: int) -> None:
        self.steps.announce(step, self.reset_cache)

    def _bypass_module_hooks(self, modules: list[torch.nn.Module]) -> None:
        """Point each of ``modules`` straight at the forward under our hooks for the run (all of
        them in mode ``off``).

        Those hooks would only pass the call through, but the hook chain is several Python
        calls per module and call; the root hook alone keeps the run's statistics. A module
        whose outermost hook is not ours keeps its chain, since bypassing ours would skip
        the others too.
        """
        for mod in modules:
            hooked = mod.__dict__.get("forward")
            inner = forward_under(mod, (CACHE_HOOK, CLUSTER_HOOK))
            if hooked is None or inner is None:
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
        branch, step = self.steps.locate(self.state_manager, args, kwargs, self.reset_cache)
        if step is None:
            step = branch.calls
        branch.calls += 1
        x = first_tensor(args, kwargs)
        signature = (tuple(x.shape), x.dtype, x.device) if x is not None else None
        if branch.signature != signature or step <= branch.step:
            # New shape or a step index that went backwards: a new sequence in this branch.
            if branch.signature is not None:
                self.counters.add_cache_bytes(-branch.drop_tensors())
            branch.signature = signature
            branch.last_full = -1
        branch.step = step
        cfg = self.config
        full = (not self.caching) or branch.last_full < 0 or cfg.is_full_step(step)
        # The guard's layout window: a step of it due to be cached runs in full, for every sample
        # (it depends on the step alone, so batch mates and ranks agree), and counts as a trip.
        branch.layout_trip = not full and cfg.guard and step < self.layout_steps
        full = full or branch.layout_trip
        group = self.parallel
        branch.full = full
        # The divergence guard (clusca.guard): ClusCa measures its cached steps at their fresh
        # tokens while they run; the other modes are judged before the step, per sample.
        guarding = not full and cfg.guard
        branch.measure = [] if guarding and self.uses_clusters else None
        branch.batch = x.shape[0] if x is not None and x.ndim >= 1 else 0
        branch.tripped = (guard.trips(branch, step, cfg.guard_bound, cfg.predictor if self.order else "taylor",
                                      cfg.hermite_scale) if guarding and not self.uses_clusters else [])
        if guarding and not self.uses_clusters and group is not None:
            # Every rank must recompute the same samples: its collectives pair up only then.
            branch.tripped = group.union(branch.tripped, branch.batch, device_of(self.model))
        branch.recomputed = []
        # Classifier-free guidance in one call feeds the same latents twice: detect it once per
        # full step so that k-means can give both halves of an image the same clusters, and the
        # guard can decide for both halves of an image together.
        halves = bool(
            full and (self.uses_clusters and cfg.guidance_pairs or self.caching and cfg.guard) and x is not None
            and x.ndim >= 2 and x.shape[0] % 2 == 0 and torch.equal(x[: x.shape[0] // 2], x[x.shape[0] // 2:])
        )
        if group is not None and full and (self.uses_clusters and cfg.guidance_pairs or self.caching and cfg.guard):
            halves = group.all(halves, device_of(self.model))  # each rank sees its own shard
        branch.guidance_pair = halves and self.uses_clusters and cfg.guidance_pairs
        branch.halves_equal = halves
        if not full:
            branch.coeffs = self.coefficients(step - branch.last_full)
        self.branch = branch
        if not branch.probed:
            self.probe.begin(branch, args, kwargs)

    def end_call(self, out: Any = None) -> None:
        """The call returned ``out`` (its output feeds the divergence guard on full steps)."""
        branch = self.branch
        c = self.counters
        if branch.probed is None:
            self.probe.end(branch)
        c.calls += 1
        tokens = sum(st.tokens for st in branch.slots)
        c.tokens_uncached += tokens
        c.flops_uncached += branch.flops_call
        key = (c.sequences, branch.step)
        if branch.full:
            if branch.layout_trip and key not in c.full_steps:
                c.guard_trips += 1
            c.full_steps.add(key)
            c.tokens_computed += tokens
            c.flops += branch.flops_call
            branch.last_full = branch.step
            if self.caching and self.config.guard:
                c.add_cache_bytes(guard.observe(branch, out, self.order, branch.halves_equal,
                                                estimate=not self.guard_measures))
        elif branch.recomputed:
            # The guard computed some samples of this step in full: it counts as a full step,
            # with the work of those samples (all of them when no cached step ran first).
            c.full_steps.add(key)
            c.guard_trips += 1
            n, b = len(branch.recomputed), max(branch.batch, 1)
            c.tokens_computed += tokens * n // b
            c.flops += branch.flops_call * n // b + (branch.flops_unhooked if n < b else 0)
        else:
            c.cached_steps.add(key)
            c.flops += branch.flops_unhooked

    @property
    def guard_measures(self) -> bool:
        """Every cached step measures its error at its fresh tokens (eager ClusCa): the guard then
        needs no estimate. Compiled or recorded cached steps measure nothing."""
        compiled = self.adapter is not None and getattr(self.adapter, "compiled", False)
        return self.uses_clusters and not self.keeping and not compiled

    def abort_call(self) -> None:
        """The transformer call raised: stop a running probe without keeping its counts."""
        if self.branch.probed is None:
            self.probe.end(self.branch, completed=False)

    # ---------------------------------------------------------------- cache bookkeeping
    def record(self, st: SlotState, tensors: list[torch.Tensor], keep_raw: bool, text_pos: int | None = None,
               substitute: torch.Tensor | None = None) -> None:
        """Full step: fold the module's true outputs into its Taylor factors.

        While the text stream is dead, the output at ``text_pos`` gets none: a cached step
        answers it with ``substitute`` (a same-shaped input of the call), or with a copy of
        this output when the shapes differ. In the guard's recompute mode the outputs
        re-anchor the recomputed samples' rows instead (:func:`clusca.recompute.reanchor`).
        """
        if self.branch.refresh is not None:
            recompute.reanchor(self, st, tensors)
            return
        before = st.nbytes()
        st.dead_pos = st.dead_kept = None
        if self.text_dead and text_pos is not None and text_pos < len(tensors):
            dead = tensors[text_pos]
            st.dead_pos = text_pos
            if substitute is None or substitute.shape != dead.shape:
                st.dead_kept = dead.detach().clone()
            tensors = tensors[:text_pos] + tensors[text_pos + 1:]
        st.record(tensors, self.branch.step, self.order, keep_raw, self._buffers(st, keep_raw))
        self.counters.add_cache_bytes(st.nbytes() - before)

    def _buffers(self, st: SlotState, keep_raw: bool):
        """Where a new allocation of ``st``'s factors comes from: ``None`` (new tensors), or,
        while capture keeps them, the buffers of this (settings, call shape) family."""
        if not self.keeping:
            return None
        fam = self.kept.family((self._settings_key, self.branch.signature))
        name, order = self.branch.name, self.order
        return lambda pos, t: fam.take((name, st.index, pos, tuple(t.shape), t.dtype, order, keep_raw), t, order,
                                       keep_raw)

    def graphs(self) -> dict:
        """This branch's recorded cached steps: they live with the kept family, so later runs
        of the family replay them (only called while capture keeps buffers)."""
        return self.kept.family((self._settings_key, self.branch.signature)).graphs

    def coefficients(self, d: int) -> tuple[float, ...]:
        """The prediction weights of this run's order and predictor, ``d`` steps after a full step."""
        cfg = self.config
        return prediction_weights(d, self.order, cfg.predictor, cfg.hermite_scale)

    def coeffs_for(self, st: SlotState) -> tuple[float, ...]:
        branch = self.branch
        if st.last_full == branch.last_full:
            return branch.coeffs
        return self.coefficients(branch.step - st.last_full)

    def fresh_rows(self, group: str, clusters) -> tuple[torch.Tensor, ...]:
        """This step's fresh rows of every feed-forward module of ``group`` (see ``FreshTokens``)."""
        return self.fresh.rows(self.branch, self.config, self.num_inference_steps, group, clusters)

    def fresh_table(self, group: str, clusters) -> torch.Tensor:
        """The same rows as one ``(layers, rows)`` tensor (see ``FreshTokens.table``)."""
        return self.fresh.table(self.branch, self.config, self.num_inference_steps, group, clusters)

    def count_fresh(self, st: SlotState, n_fresh: int) -> None:
        c = self.counters
        c.tokens_computed += n_fresh
        if st.tokens:
            c.flops += st.flops * n_fresh // st.tokens
