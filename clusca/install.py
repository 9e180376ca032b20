"""Installing the ClusCa hooks on a transformer, and taking them off again.

:func:`apply_clusca` finds the architecture's module-name patterns
(:mod:`clusca.patterns`), plans one slot per hooked module, links the feed-forward chains,
registers the hook classes of :mod:`clusca.hooks` through diffusers' ``HookRegistry``
and attaches the run controller; :func:`remove_clusca` restores the original model.
"""

from __future__ import annotations

import re

import torch

from . import diffusers_compat as compat
from .calls import arg_position
from .config import ClusCaConfig
from .controller import CACHE_HOOK, CLUSTER_HOOK, ROOT_HOOK, ClusCaController, Slot
from .hooks import BlockHook, ClusCaRootHook, ClusterHook, FeedForwardHook, TaylorHook, TextStreamHook
from .patterns import ARCHITECTURES, ArchitecturePatterns, find_architecture

_CONTROLLER_ATTR = "_clusca_controller"

def _match(patterns, name: str) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def _plan(model: torch.nn.Module, arch: ArchitecturePatterns) -> tuple[list[Slot], list[torch.nn.Module], str | None]:
    slots: list[Slot] = []
    modules: list[torch.nn.Module] = []
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
            residuals = [(r, arg_position(mod.forward, r)) for r in arch.block_residuals]
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
        slot = Slot(len(slots), name, role, group, residuals)
        slot.text_pos = _text_position(arch, slot)
        slots.append(slot)
        modules.append(mod)
        taken.append(name)
    if arch.chain_blocks:
        _link_chains(slots)
    return slots, modules, cluster_name


def _text_position(arch: ArchitecturePatterns, slot: Slot) -> int | None:
    """Which output of the slot's module is text tokens, when the text stream can be dead."""
    if not arch.text_stream:
        return None
    if slot.role == "attention":
        return arch.text_outputs.get("attention")
    if slot.role == "block":
        names = [name for name, _ in slot.residuals]
        text = arch.text_outputs.get("block")
        return names.index(text) if text in names else None
    if slot.role == "feedforward" and slot.group == "text":
        return 0
    return None


def _link_chains(slots: list[Slot]) -> None:
    """Group consecutive block slots with the same parent (e.g. one ModuleList) into chains."""
    chain: list[Slot] = []

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


_HOOKS = {"attention": TaylorHook, "block": BlockHook, "feedforward": FeedForwardHook, "text": TextStreamHook}


def apply_clusca(
    model: torch.nn.Module,
    config: ClusCaConfig | None = None,
    *,
    architecture: ArchitecturePatterns | None = None,
    lean: bool = True,
) -> ClusCaController:
    """Install the ClusCa hooks on a diffusers transformer (inactive until ``clusca_run``).

    ``config`` becomes the default settings of runs that pass none; its ``modules`` field
    (if set) overrides the architecture's module patterns. Calling it again with other
    patterns re-installs the hooks; with the same patterns it only updates the defaults.
    ``lean`` lets cached steps use the architecture's lean cached step (``clusca.adapters``)
    where there is one; ``False`` keeps every cached step on the module hooks (same results,
    more operators per step), for debugging or for hooks of one's own on the modules.
    """
    from .adapters import adapter_for

    config = (config if config is not None else ClusCaConfig()).validate()
    base_arch = architecture or find_architecture(model)
    arch = base_arch.with_overrides(config.modules)
    existing = get_controller(model)
    if existing is not None:
        if existing.arch == arch and (existing.adapter is not None) == (lean and existing.lean_available):
            existing.default_config = config
            return existing
        remove_clusca(model)
    slots, modules, cluster_name = _plan(model, arch)
    if not slots:
        raise ValueError(f"modules: no module of {type(model).__name__} matches the ClusCa patterns")
    ctrl = ClusCaController(model, arch, slots, modules, config)
    ctrl.base_arch = base_arch

    compat.register(model, ClusCaRootHook(ctrl), ROOT_HOOK)
    hooks = []
    for slot, mod in zip(slots, modules):
        hook = _HOOKS[slot.role](ctrl, slot)
        compat.register(mod, hook, CACHE_HOOK)
        hooks.append(hook)
    if cluster_name is not None and arch.cluster_sources:
        mod = model.get_submodule(cluster_name)
        positions = {key: arg_position(mod.forward, key) for where, key in arch.cluster_sources.values() if where == "input"}
        compat.register(mod, ClusterHook(ctrl, dict(arch.cluster_sources), positions), CLUSTER_HOOK)
        if all(mod is not m for m in ctrl.bypass_modules):
            ctrl.bypass_modules.append(mod)
    compat.refresh_children(model)
    # The lean cached step relies on the shipped patterns (what is predicted, what is dead).
    adapter = adapter_for(model, ctrl, hooks) if arch == ARCHITECTURES.get(arch.name) else None
    ctrl.lean_available = adapter is not None
    ctrl.slot_hooks = hooks
    ctrl.adapter = adapter if lean else None
    model.__dict__[_CONTROLLER_ATTR] = ctrl
    return ctrl


def remove_clusca(model: torch.nn.Module) -> None:
    """Remove every ClusCa hook; the model behaves exactly as before ``apply_clusca``."""
    ctrl = get_controller(model)
    if ctrl is None:
        return
    if ctrl.active:
        raise RuntimeError("remove_clusca: a ClusCa run is active on this model; leave the clusca_run block first")
    compat.remove(model, (CLUSTER_HOOK, CACHE_HOOK, ROOT_HOOK))
    ctrl.reset()
    del model.__dict__[_CONTROLLER_ATTR]
