"""ClusCa: cluster-driven feature caching for diffusers diffusion transformers.

``ClusCaConfig`` and ``PRESETS`` load without torch (the HTTP API process relies on
that); the hook machinery is imported lazily on first use of its names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import DEFAULT_PRESET, MODES, PRESETS, ClusCaConfig

_LAZY = {
    "apply_clusca": "install",
    "remove_clusca": "install",
    "is_clusca_applied": "install",
    "clusca_run": "run",
    "ClusCaRun": "run",
    "RunStats": "run",
    "run_state": "inspect",
    "compile_clusca": "compile",
    "uncompile_clusca": "compile",
    "RunState": "inspect",
    "ARCHITECTURES": "patterns",
    "ArchitecturePatterns": "patterns",
}

__all__ = ["ClusCaConfig", "PRESETS", "MODES", "DEFAULT_PRESET", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from .install import apply_clusca, is_clusca_applied, remove_clusca
    from .compile import compile_clusca, uncompile_clusca
    from .inspect import RunState, run_state
    from .patterns import ARCHITECTURES, ArchitecturePatterns
    from .run import ClusCaRun, RunStats, clusca_run


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'clusca' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
