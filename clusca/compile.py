"""torch.compile with the cache installed: regional compilation.

Compiling the whole transformer would trace the cache's own bookkeeping (which step, which
branch, what to record), whose Python state changes every step, so every step would
recompile or break the graph. Instead two kinds of region are compiled, both free of that
state, and the hooks stay eager around them:

* the forward of every hooked module (attention, feed-forward, single-stream block), which
  is what a full step spends its time in; repeated blocks share their compiled code;
* the lean cached step's per-block function (``dual_block_step`` for FLUX), compiled with
  ``fullgraph=True``: a cached block is one graph, and a break in it is an error.

Step offsets and mixing ratios are Python floats, which dynamo turns into graph inputs
after the first recompilation, so a run compiles a handful of graphs and requests that
change only cache settings reuse them (tests/clusca/test_clusca_compile.py counts them).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from .install import get_controller

_COMPILED_ROLES = ("attention", "feedforward", "block")
# Compiled forwards by module and settings: hooks installed again (or compiled again) reuse
# them, so their graphs are not traced a second time.
_FORWARDS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, Any]]" = weakref.WeakKeyDictionary()


def compile_clusca(model: torch.nn.Module, *, modules: bool = True, cached_steps: bool = True,
                   **compile_kwargs: Any) -> None:
    """Compile the regions of a hooked transformer (``apply_clusca`` first).

    ``compile_kwargs`` go to ``torch.compile`` (``mode``, ``backend``, ``dynamic``, ...).
    Calling it again replaces the compiled regions; ``uncompile_clusca`` drops them.
    """
    ctrl = get_controller(model)
    if ctrl is None:
        raise ValueError("compile_clusca: ClusCa is not applied to this model (call apply_clusca first)")
    from .parallel import parallel_group

    if parallel_group(model) is not None:
        # Compiled regions would trace diffusers' collectives, untested with the group's ordering.
        raise ValueError("compile_clusca: not supported under context parallelism (clusca.parallel); "
                         "run the group uncompiled")
    uncompile_clusca(model)
    key = repr(sorted(compile_kwargs.items()))
    if modules:
        for hook, module in zip(ctrl.slot_hooks, ctrl.slot_modules):
            if hook.slot.role in _COMPILED_ROLES:
                known = _FORWARDS.setdefault(module, {})
                if key not in known:
                    known[key] = torch.compile(hook.fn_ref.original_forward, **compile_kwargs)
                hook.compiled = known[key]
    if cached_steps and ctrl.adapter is not None:
        ctrl.adapter.compile(fullgraph=True, **compile_kwargs)


def uncompile_clusca(model: torch.nn.Module) -> None:
    """Back to eager regions (the compiled code is dropped)."""
    ctrl = get_controller(model)
    if ctrl is None:
        return
    for hook in ctrl.slot_hooks:
        hook.compiled = None
    if ctrl.adapter is not None:
        ctrl.adapter.uncompile()
