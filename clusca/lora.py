"""LoRA adapters per sample: one batch, a different adapter set for each of its images.

A :class:`LoraBank` gives every targeted ``nn.Linear`` of a transformer fixed buffers for
``slots`` adapters, each padded to ``max_rank`` (slot 0 is always empty: no adapter). An
adapter is loaded into a slot by copying its weights into those buffers in place, so the
tensors a compiled graph or a recorded CUDA graph reads never change identity; only their
contents do. Before each pipeline call :meth:`LoraBank.select` says which slots (and
scales) each image uses, up to ``per_sample`` of them.

Every targeted linear then computes its base product once for the whole batch and adds
each row's own low-rank delta, gathered per sample::

    y[n] = base(x[n]) + sum_k scale[n, k] * (x[n] @ A[slot[n, k]].T) @ B[slot[n, k]].T

as batched-LoRA kernels do in LLM serving. A row's delta reads only its own sample's
adapters, so an image of a mixed batch is the image of its solo run: the ClusCa cache
keeps its state per sample too (its clusters, fresh tokens and Taylor factors are
per-sample rows), so nothing crosses a job or an adapter boundary.

Rows of the transformer's batch map to images as ``row % images``: a pipeline that runs
classifier-free guidance in one call stacks its halves (every image once per half).

The selection lives in fixed buffers too: one ``(images, per_sample)`` pair of slot and scale
tensors per image count, allocated the first time a call has that many images and written in
place by every later :meth:`LoraBank.select`. A graph recorded with adapters (a CUDA graph of
ClusCa's cached step, a ``torch.compile`` graph) therefore reads the current call's slots and
scales when it replays, not those of the call that recorded it. What stays a Python decision
is whether the bank adds a delta at all (no image of the call uses an adapter: nothing is
computed) and how rows map to images; the bank registers both as a capture key part of the
model (:func:`clusca.capture.add_key_part`), so ClusCa records a cached step once per such
state and never replays one across it.

Files: a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) or one
``.safetensors`` file whose keys end in ``.lora_A.weight`` / ``.lora_B.weight`` (the
diffusers and PEFT spelling), with an optional ``<module>.alpha`` per layer.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from .capture import add_key_part, remove_key_part

_PREFIXES = ("base_model.model.", "transformer.", "unet.")
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.default)?\.weight$")
_BANK_IDS = itertools.count(1)


class LoraError(ValueError):
    """An adapter that cannot be used here: its file, its shapes or its modules."""


@dataclass(frozen=True)
class LoraWeights:
    """One adapter: per target module name, its down (``A``: rank x in) and up (``B``: out x rank)
    matrices, and the scale ``alpha / rank`` its training used."""

    name: str
    rank: int
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=list)

    @property
    def scaling(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.layers.values())


def _strip(module: str) -> str:
    for p in _PREFIXES:
        if module.startswith(p):
            return module[len(p):]
    return module


def load_lora(path: str | Path, name: str | None = None, max_bytes: int | None = None) -> LoraWeights:
    """An adapter from a PEFT folder or a single ``.safetensors`` file; :class:`LoraError` says why not."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config: dict = {}
    if path.is_dir():
        cfg = path / "adapter_config.json"
        if cfg.exists():
            try:
                config = json.loads(cfg.read_text())
            except (OSError, ValueError) as exc:
                raise LoraError(f"adapter_config.json is not valid JSON: {exc}") from None
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise LoraError(f"expected one .safetensors file in {path.name}, found {len(files)}")
        file = files[0]
    else:
        file = path
    if max_bytes is not None and file.stat().st_size > max_bytes:
        raise LoraError(f"{file.name} is {file.stat().st_size} bytes, over the limit of {max_bytes}")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LoraError(f"{file.name} is not a readable safetensors file ({exc})") from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m:
            parts.setdefault(_strip(m["module"]), {})[m["part"]] = t
        elif key.endswith(".alpha") and t.numel() == 1:
            alphas[_strip(key[: -len(".alpha")])] = float(t)
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    ranks = set()
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise LoraError(f"layer {module!r} has only lora_{next(iter(ab))}")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoraError(f"layer {module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not pair")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise LoraError(f"layer {module!r} holds NaN or infinite weights")
        layers[module] = (a.float(), b.float())
        ranks.add(a.shape[0])
    if not layers:
        raise LoraError(f"{file.name} holds no LoRA layers (keys ending in .lora_A.weight / .lora_B.weight)")
    rank = int(config.get("r") or max(ranks))
    alpha = config.get("lora_alpha")
    if alpha is None and alphas:
        alpha = next(iter(alphas.values()))
    targets = config.get("target_modules") or sorted({m.rsplit(".", 1)[-1] for m in layers})
    return LoraWeights(name or path.stem, rank, layers, None if alpha is None else float(alpha),
                       sorted(targets) if isinstance(targets, list) else [str(targets)])


class _LoraLinear:
    """The per-sample delta of one linear layer, from the bank's buffers for it."""

    def __init__(self, linear: nn.Linear, slots: int, max_rank: int):
        w = linear.weight
        self.down = torch.zeros(slots + 1, max_rank, linear.in_features, dtype=w.dtype, device=w.device)
        self.up = torch.zeros(slots + 1, linear.out_features, max_rank, dtype=w.dtype, device=w.device)
        self.handle = linear.register_forward_hook(self._add_delta)
        self.bank: LoraBank | None = None

    def _add_delta(self, _mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        bank = self.bank
        if bank is None or not bank.active:
            return out  # no image of this call uses an adapter: no delta at all
        x = args[0]
        rows = x.shape[0]
        per_row = bank.per_row(rows)  # (rows, k) slots and scales
        if per_row is None:
            return out
        slot, scale = per_row
        k, r = slot.shape[1], self.down.shape[1]
        down = self.down[slot].reshape(rows, k * r, -1)  # (rows, k*r, in)
        up = (self.up[slot] * scale[:, :, None, None].to(self.up.dtype)).permute(0, 2, 1, 3)  # (rows, out, k, r)
        up = up.reshape(rows, -1, k * r)
        flat = x.reshape(rows, -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(flat, down.transpose(1, 2)), up.transpose(1, 2))
        return out + delta.reshape(out.shape)


class LoraBank:
    """Fixed LoRA buffers on the ``nn.Linear`` modules of ``model`` whose names match ``targets``.

    ``slots`` adapters can be loaded at once (slot numbers 1..slots), each of rank up to
    ``max_rank``; a sample uses up to ``per_sample`` of them.
    """

    def __init__(self, model: nn.Module, targets: Iterable[str], *, slots: int = 8, max_rank: int = 16,
                 per_sample: int = 2):
        patterns = [re.compile(t) for t in targets]
        self.slots, self.max_rank, self.per_sample = slots, max_rank, per_sample
        self.layers: dict[str, _LoraLinear] = {}
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and any(p.fullmatch(name) for p in patterns):
                layer = _LoraLinear(mod, slots, max_rank)
                layer.bank = self
                self.layers[name] = layer
        if not self.layers:
            raise LoraError("no linear layer of the model matches the adapter targets")
        self.loaded: dict[int, str] = {}
        self.active = False
        # Tells this bank's recorded steps from those of a bank installed after it on the same model:
        # they read other buffers.
        self.uid = next(_BANK_IDS)
        self.device = next(iter(self.layers.values())).down.device
        # The selection of each image count, written in place by select: a recorded graph reads
        # the current call's slots and scales (see the module docstring).
        self._selections: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._slot, self._scale = self._selection(1)
        self._model = model
        add_key_part(model, self.key_part)

    def check(self, weights: LoraWeights) -> None:
        """:class:`LoraError` unless ``weights`` fits this bank: known modules, shapes, rank."""
        if weights.rank > self.max_rank:
            raise LoraError(f"rank {weights.rank} is over this model's maximum of {self.max_rank}")
        for module, (a, b) in weights.layers.items():
            layer = self.layers.get(module)
            if layer is None:
                raise LoraError(f"layer {module!r} is not one this model's adapters may target")
            if a.shape[1] != layer.down.shape[2] or b.shape[0] != layer.up.shape[1] or a.shape[0] > self.max_rank:
                raise LoraError(f"layer {module!r}: shapes {tuple(a.shape)} / {tuple(b.shape)} do not fit "
                                f"({layer.down.shape[2]} in, {layer.up.shape[1]} out)")

    @torch.no_grad()
    def load(self, slot: int, weights: LoraWeights) -> None:
        """Copy ``weights`` into ``slot`` (1..slots), in place; the slot's previous adapter is gone."""
        if not 1 <= slot <= self.slots:
            raise ValueError(f"slot must be 1..{self.slots}")
        self.check(weights)
        s = weights.scaling
        for name, layer in self.layers.items():
            layer.down[slot].zero_()
            layer.up[slot].zero_()
            if name in weights.layers:
                a, b = weights.layers[name]
                r = a.shape[0]
                layer.down[slot, :r].copy_(a)
                layer.up[slot, :, :r].copy_(b * s)
        self.loaded[slot] = weights.name

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.down[slot].zero_()
            layer.up[slot].zero_()
        self.loaded.pop(slot, None)

    def select(self, per_image: Sequence[Sequence[tuple[int, float]]]) -> None:
        """The ``(slot, scale)`` pairs of each image of the next call (``[]``: no adapter), written in
        place into the buffers of that many images."""
        if any(len(s) > self.per_sample for s in per_image):
            raise ValueError(f"at most {self.per_sample} adapters per image")
        n = len(per_image)
        slot = torch.zeros(n, self.per_sample, dtype=torch.long)
        scale = torch.zeros(n, self.per_sample)
        for i, pairs in enumerate(per_image):
            for k, (sl, sc) in enumerate(pairs):
                if sl not in self.loaded:
                    raise ValueError(f"slot {sl} holds no adapter")
                slot[i, k], scale[i, k] = sl, sc
        active = any(len(s) for s in per_image)
        if active:
            self._slot, self._scale = self._selection(n)
            self._slot.copy_(slot)
            self._scale.copy_(scale)
        self.active = active

    def _selection(self, images: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot and scale buffers of calls with ``images`` images, allocated once."""
        got = self._selections.get(images)
        if got is None:
            got = self._selections[images] = (
                torch.zeros(images, self.per_sample, dtype=torch.long, device=self.device),
                torch.zeros(images, self.per_sample, device=self.device))
        return got

    def key_part(self) -> tuple:
        """What a step recorded through this bank baked in as Python: whether it adds a delta and,
        if so, which buffers it reads (this bank's, those of this many images)."""
        if not self.active:
            return ("lora", None)
        return ("lora", self.uid, self._slot.shape[0], self.per_sample)

    def per_row(self, rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        n = self._slot.shape[0]
        if rows % n:
            return None  # not this call's batch (e.g. a probe): no adapter
        reps = rows // n
        if reps == 1:
            return self._slot, self._scale
        return self._slot.repeat(reps, 1), self._scale.repeat(reps, 1)

    def remove(self) -> None:
        """Take every hook off the model (the buffers go with them)."""
        for layer in self.layers.values():
            layer.handle.remove()
            layer.bank = None
        self.layers.clear()
        self.active = False
        remove_key_part(self._model, self.key_part)
