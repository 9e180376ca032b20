"""Reading a module call: its arguments by name, its output tensors, the key of its shapes."""

from __future__ import annotations

import inspect
from typing import Any

import torch


def arg_position(fn: Any, name: str) -> int | None:
    """Positional index of parameter ``name`` of a bound forward, if it can be positional."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    for i, p in enumerate(params):
        if p.name == name and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return i
    return None


def get_arg(args: tuple, kwargs: dict, name: str, pos: int | None) -> Any:
    if name in kwargs:
        return kwargs[name]
    if pos is not None and pos < len(args):
        return args[pos]
    return None


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    x = kwargs.get("hidden_states")
    return x if isinstance(x, torch.Tensor) else None


def call_key(value: Any) -> Any:
    """What the FLOPs of a call can depend on: tensor shapes and dtypes, plain values, their nesting.

    Float values are left out (a timestep or a scale changes no shape), so the calls of one
    denoising loop share a key.
    """
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)):
        return tuple(call_key(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, call_key(v)) for k, v in value.items())
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return type(value).__qualname__


def flatten(out: Any) -> tuple[tuple | None, list[torch.Tensor]]:
    """Split a module output into (layout, tensors); layout None means a plain tensor."""
    if isinstance(out, torch.Tensor):
        return None, [out]
    if isinstance(out, (tuple, list)):
        layout = tuple(isinstance(o, torch.Tensor) for o in out)
        if all(isinstance(o, torch.Tensor) or o is None for o in out):
            return layout, [o for o in out if o is not None]
    raise TypeError(f"ClusCa cannot cache an output of type {type(out).__name__}")


def unflatten(layout: tuple | None, tensors: list[torch.Tensor]) -> Any:
    if layout is None:
        return tensors[0]
    it = iter(tensors)
    return tuple(next(it) if present else None for present in layout)


def device_of(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s parameters live (the CPU for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
