"""Analytic FLOPs of a transformer call, attributed to the hooked modules.

On a full call of a new shape, temporary torch hooks count linear, convolution and
attention FLOPs per hooked module (and outside them); the counts are kept by call key, so
a call with the same shapes as an earlier one (the same request again) costs a lookup.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .calls import call_key, get_arg
from .state import BranchState

_KEPT = 64


class FlopsProbe:
    def __init__(self, model: torch.nn.Module, slots: list, slot_modules: list[torch.nn.Module]) -> None:
        self.slots = slots
        self.slot_modules = slot_modules
        self.targets: list[tuple[torch.nn.Module, int, str]] = []
        owners = [(s.name, s.index) for s in slots]
        for name, mod in model.named_modules():
            owner = len(slots)  # outside any hooked module
            for prefix, idx in owners:
                if name == prefix or name.startswith(prefix + "."):
                    owner = idx
                    break
            if isinstance(mod, torch.nn.Linear):
                self.targets.append((mod, owner, "linear"))
            elif isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                self.targets.append((mod, owner, "conv"))
            elif hasattr(mod, "processor") and hasattr(mod, "to_q"):
                self.targets.append((mod, owner, "attention"))
        self._known: dict[Any, tuple[list[int], list[int]]] = {}
        self._running: tuple | None = None

    @property
    def running(self) -> bool:
        return self._running is not None

    def begin(self, branch: BranchState, args: tuple, kwargs: dict) -> None:
        """Start counting this call, or reuse the counts of an earlier call with the same key."""
        key = (call_key(args), call_key(kwargs))
        known = self._known.get(key)
        if known is not None:
            _set_counts(branch, self.slots, *known)
            return
        flops = [0] * (len(self.slots) + 1)  # last entry: outside any hooked module
        tokens = [0] * len(self.slots)
        handles = []
        for slot in self.slots:
            mod = self.slot_modules[slot.index]
            handles.append(mod.register_forward_pre_hook(_token_hook(slot, tokens), with_kwargs=True))
        for mod, owner, kind in self.targets:
            if kind == "linear":
                handles.append(mod.register_forward_hook(_linear_hook(flops, owner)))
            elif kind == "conv":
                handles.append(mod.register_forward_hook(_conv_hook(flops, owner)))
            else:
                handles.append(mod.register_forward_pre_hook(_attention_hook(flops, owner), with_kwargs=True))
        self._running = (flops, tokens, handles, key)
        branch.probed = None  # marks "probe running" for end()

    def end(self, branch: BranchState, completed: bool = True) -> None:
        flops, tokens, handles, key = self._running
        for h in handles:
            h.remove()
        self._running = None
        if completed:  # a call that raised may not have reached every module
            if len(self._known) >= _KEPT:
                self._known.pop(next(iter(self._known)))
            self._known[key] = (flops, tokens)
        _set_counts(branch, self.slots, flops, tokens)


def _set_counts(branch: BranchState, slots: list, flops: list[int], tokens: list[int]) -> None:
    for s in slots:
        branch.slots[s.index].flops = flops[s.index]
        branch.slots[s.index].tokens = tokens[s.index]
    branch.flops_call = sum(flops)
    branch.flops_unhooked = flops[-1]
    branch.probed = True


def _linear_hook(flops: list[int], owner: int):
    def hook(mod, inputs, output):
        x = inputs[0] if inputs else None
        if isinstance(x, torch.Tensor) and x.shape[-1] == mod.in_features:
            flops[owner] += 2 * mod.in_features * mod.out_features * (x.numel() // mod.in_features)

    return hook


def _conv_hook(flops: list[int], owner: int):
    def hook(mod, inputs, output):
        if isinstance(output, torch.Tensor):
            k = math.prod(mod.kernel_size) * (mod.in_channels // mod.groups)
            flops[owner] += 2 * k * output.numel()

    return hook


def _attention_hook(flops: list[int], owner: int):
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


def _token_hook(slot, tokens: list[int]):
    # Token count of an uncached call, known even when the hooks pass through (mode off).
    names = [name for name, _ in slot.residuals] if slot.role == "block" else ["hidden_states"]
    positions = [pos for _, pos in slot.residuals] if slot.role == "block" else [0]

    def hook(mod, args, kwargs):
        total = 0
        for name, pos in zip(names, positions):
            t = get_arg(args, kwargs, name, pos)
            if isinstance(t, torch.Tensor) and t.ndim >= 2:
                total += t.numel() // t.shape[-1]
        tokens[slot.index] = total

    return hook
