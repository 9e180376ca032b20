"""Trainable LoRA layers on a frozen transformer, and the PEFT folder they are saved as.

The trainer's ``--lora-rank`` mode puts a :class:`LoraTrainer` on the built-in model's
transformer: every ``nn.Linear`` whose name matches one of the targets gets a down (``A``:
rank x in) and an up (``B``: out x rank) matrix, added as ``x @ A.T @ B.T * alpha / rank`` by a
forward hook, so the base weights stay untouched. ``B`` starts at zero: before the first step
the adapted model is the base model. :meth:`LoraTrainer.save` writes what
:func:`clusca.lora.load_lora` reads: ``adapter_config.json`` (``r``, ``lora_alpha``,
``target_modules``) and ``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight``
and ``.lora_B.weight`` keys.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from typing import Iterable

import torch
from torch import nn

# The layers the service's adapter bank targets on a FLUX transformer: attention projections of
# both streams, the single blocks' MLP in and out, and the dual blocks' feed-forward layers.
FLUX_TARGETS = (r".*\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|proj_mlp|proj_out)",
                r".*\.ff\.net\.(0\.proj|2)")


class LoraTrainer:
    """LoRA matrices for the linears of ``model`` that match ``targets``; ``parameters()`` trains them."""

    def __init__(self, model: nn.Module, rank: int, alpha: float | None = None,
                 targets: Iterable[str] = FLUX_TARGETS, seed: int = 0):
        patterns = [re.compile(t) for t in targets]
        self.rank, self.alpha = rank, float(alpha if alpha is not None else rank)
        self.scaling = self.alpha / rank
        g = torch.Generator().manual_seed(seed)
        self.layers: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
        self._handles = []
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and any(p.fullmatch(name) for p in patterns):
                w = mod.weight
                # A as nn.Linear initialises its weight (uniform, 1 / sqrt(in)); B at zero.
                bound = 1.0 / math.sqrt(mod.in_features)
                a = nn.Parameter((torch.rand(rank, mod.in_features, generator=g) * 2 - 1) * bound)
                b = nn.Parameter(torch.zeros(mod.out_features, rank))
                a.data, b.data = a.data.to(w.device, w.dtype), b.data.to(w.device, w.dtype)
                self.layers[name] = (a, b)
                self._handles.append(mod.register_forward_hook(self._hook(a, b)))
        if not self.layers:
            raise ValueError("no linear layer of the model matches the LoRA targets")
        # PEFT's target_modules: module names as they read inside a block ("attn.to_q", "ff.net.2").
        self.targets = sorted({re.sub(r"^(single_)?transformer_blocks\.\d+\.", "", name) for name in self.layers})

    def _hook(self, a: nn.Parameter, b: nn.Parameter):
        def add_delta(_mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            return out + (args[0] @ a.t()) @ b.t() * self.scaling

        return add_delta

    @torch.no_grad()
    def load(self, folder: str) -> None:
        """Start from the adapter in ``folder`` (a PEFT folder of the same rank and layers)."""
        from clusca.lora import load_lora

        weights = load_lora(folder)
        if weights.rank != self.rank or set(weights.layers) != set(self.layers):
            raise ValueError(f"{folder}: rank {weights.rank} on {len(weights.layers)} linears, not rank {self.rank} "
                             f"on these {len(self.layers)}")
        for name, (a, b) in self.layers.items():
            wa, wb = weights.layers[name]
            a.copy_(wa)
            # load_lora keeps the file's matrices; their scale is this adapter's, alpha / rank.
            b.copy_(wb * weights.scaling / self.scaling)

    def parameters(self) -> list[nn.Parameter]:
        return [p for ab in self.layers.values() for p in ab]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def state(self) -> dict[str, torch.Tensor]:
        """The PEFT spelling of every matrix, as float32 CPU tensors."""
        out = {}
        for name, (a, b) in self.layers.items():
            out[f"base_model.model.{name}.lora_A.weight"] = a.detach().float().cpu().contiguous()
            out[f"base_model.model.{name}.lora_B.weight"] = b.detach().float().cpu().contiguous()
        return out

    def save(self, folder: str, tensors: dict[str, torch.Tensor] | None = None, extra: dict | None = None) -> None:
        """Write the PEFT folder (``tensors``: e.g. EMA weights in :meth:`state`'s keys); the folder
        is swapped in whole, so a reader never sees half an adapter."""
        from safetensors.torch import save_file

        tmp = folder.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file(tensors if tensors is not None else self.state(), os.path.join(tmp, "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": self.rank, "lora_alpha": self.alpha, "target_modules": self.targets,
                  "lora_dropout": 0.0, "bias": "none", **(extra or {})}
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        old = folder.rstrip("/") + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(folder):
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
