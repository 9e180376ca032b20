"""Every use of diffusers' hook internals, in one place.

ClusCa builds on ``diffusers.hooks`` (``ModelHook``, ``HookRegistry``, ``StateManager``) the
way diffusers' own caches do. A few of the things it needs are not public API: the order of
a registry's hooks and the forward under each, and a state manager's current context. They
are read here only, and ``tests/clusca/test_clusca_lean.py`` pins the diffusers release
this was written against, so an upgrade shows up as one failing test, not as wrong caching.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks.hooks import BaseState, CacheContext, HookRegistry, ModelHook, StateManager

__all__ = ["BaseState", "CacheContext", "ModelHook", "StateManager", "TESTED_WITH"]

# The diffusers release line whose hook internals this module reads.
TESTED_WITH = "0.42"


def register(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


def remove(model: torch.nn.Module, names: tuple[str, ...]) -> None:
    """Remove the named hooks from ``model`` and every submodule."""
    registry = HookRegistry.check_if_exists_or_initialize(model)
    for name in names:
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()


def refresh_children(model: torch.nn.Module) -> None:
    """Make the root registry see hooks added to submodules (its child list is cached)."""
    model._diffusers_hook.invalidate_child_registries_cache()


def forward_under(module: torch.nn.Module, names: tuple[str, ...]) -> Any | None:
    """The forward that the outermost run of hooks named ``names`` wraps, or ``None`` when
    the module's outermost hook is not one of them (or it has none)."""
    registry = module.__dict__.get("_diffusers_hook")
    if registry is None or not registry._hook_order:
        return None
    first = len(registry._hook_order)
    while first > 0 and registry._hook_order[first - 1] in names:
        first -= 1
    if first == len(registry._hook_order):
        return None
    return registry._fn_refs[first].original_forward


def current_context(manager: StateManager) -> CacheContext | None:
    return manager._context
