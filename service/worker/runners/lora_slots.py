"""The library's adapter bank (:class:`clusca.lora.LoraBank`) as the worker's adapter slots use it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from service.registry import ModelEntry


class LoraBankSlots:
    """A :class:`~clusca.lora.LoraBank` over ``transformer``'s layers that ``entry.adapters.targets``
    name, with as many slots as ``budget_mb`` holds (at most ``entry.adapters.slots``)."""

    def __init__(self, transformer: Any, entry: ModelEntry, budget_mb: float):
        import torch
        from clusca.lora import LoraBank

        from service.worker.adapters import slots_within

        cfg = entry.adapters
        patterns = [re.compile(t) for t in cfg.targets]
        self.shapes: dict[str, tuple[int, int]] = {}
        self.slot_bytes = 0
        for name, mod in transformer.named_modules():
            if isinstance(mod, torch.nn.Linear) and any(p.fullmatch(name) for p in patterns):
                self.shapes[name] = (mod.in_features, mod.out_features)
                self.slot_bytes += cfg.max_rank * (mod.in_features + mod.out_features) * mod.weight.element_size()
        self.slots = slots_within(cfg.slots, self.slot_bytes, budget_mb)
        # LoraError (a ValueError) when no layer matches: the runner then serves no adapters.
        self.bank = LoraBank(transformer, cfg.targets, slots=self.slots, max_rank=cfg.max_rank,
                             per_sample=cfg.max_per_request)

    def load(self, slot: int, path: Path, name: str, max_bytes: int) -> None:
        """The adapter's weights into ``slot``, in place (a ``LoraError``, a ValueError, says why not)."""
        from clusca.lora import load_lora

        self.bank.load(slot, load_lora(path, name=name, max_bytes=max_bytes))

    def clear(self, slot: int) -> None:
        self.bank.clear(slot)

    def select(self, per_image: Sequence[Sequence[tuple[int, float]]]) -> None:
        self.bank.select(per_image)

    def release(self) -> None:
        self.bank.active = False
