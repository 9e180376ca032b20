"""A worker's loaded LoRA adapters: an LRU over the slots of its model's adapter bank.

The bank (:class:`clusca.lora.LoraBank`) gives every targeted linear layer fixed buffers for
``slots`` adapters, padded to ``max_rank``, allocated once when the model loads. Loading an
adapter copies its weights into a free (or the least recently used, unpinned) slot in place;
switching adapters between calls is then a choice of slot numbers per image. The tensors the
model reads never change identity or shape, whatever adapters a call uses, which is what keeps a
``torch.compile``d transformer from recompiling and a recorded CUDA graph valid: merging an
adapter into the base weights instead would make a batch one adapter set, cost a full weight
rewrite per switch, and unmerging drifts in low precision.

An adapter is found in the model's store (:mod:`service.adapters.store`) at each call, so one
added, replaced (a new file version is loaded again) or removed while the worker runs is seen
at its next batch. An adapter whose layers do not fit the model is refused at load, logged, and
reported (``adapters_unusable`` in the worker's heartbeat) so that ``GET /models`` marks it and
the API refuses it. Load times are timed (``clusca_adapter_load_seconds``, and the job result's
``adapter_load_s``); ``pins`` are loaded at start and never evicted.

The bank is the runner's (``service/worker/runners/lora_slots.py`` wraps the library's): this
module only decides which adapter goes in which slot. Without a bank (a model whose runner has
no layers to adapt, e.g. the no-op model) the slots are bookkeeping only: the same checks and
errors, no weights.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

from service import metrics
from service.adapters.files import AdapterFileError, fit_problem, inspect_adapter
from service.adapters.store import AdapterStore
from service.contract import ADAPTER_UNAVAILABLE, AdapterUse
from service.registry import ModelEntry

log = logging.getLogger("clusca.worker")


class AdapterUnavailable(Exception):
    """An adapter a job names cannot be used here (removed, unreadable, or not fitting the model)."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{ADAPTER_UNAVAILABLE}: {name!r}: {reason}")
        self.name = name


@dataclass(frozen=True)
class AdapterSource:
    """Where a worker's models find their adapters, and the settings their slots take."""

    store: AdapterStore
    budget_mb: float
    worker_id: str = ""


@dataclass
class _Resident:
    slot: int
    fingerprint: str


class AdapterSlots:
    """The adapters loaded for one model, over ``slots`` slots of ``bank`` (None: bookkeeping only):
    an object with ``load(slot, path, name, max_bytes)`` (a ``ValueError`` says why it does not fit),
    ``clear(slot)``, ``select(per_image (slot, scale) pairs)`` and ``release()``.

    ``shapes`` are the targetable layers' ``(in, out)`` by module name (None with no bank: any
    layers fit). Calls come from the worker's loop; the heartbeat thread reads :meth:`describe`.
    """

    def __init__(self, entry: ModelEntry, source: AdapterSource, bank: Any = None,
                 shapes: dict[str, tuple[int, int]] | None = None, slots: int | None = None):
        self.entry = entry
        self.store = source.store
        self.worker_id = source.worker_id
        self.bank = bank
        self.shapes = shapes
        self.max_rank = entry.adapters.max_rank
        self.slots = slots if slots is not None else entry.adapters.slots
        self.pins = [p for p in entry.adapters.pins]
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # least recently used first
        self._unusable: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        # The model's series from the start (zero), so that dashboards see them before the first load.
        metrics.ADAPTER_LOAD.labels(entry.name)
        metrics.ADAPTERS_LOADED.labels(entry.name, self.worker_id).set(0)

    # ------------------------------------------------------------------ what a call needs
    def problems(self, uses: Sequence[AdapterUse]) -> str | None:
        """Why a job naming ``uses`` cannot run here (the first adapter at fault), else None."""
        for u in uses:
            try:
                self._checked(u.name)
            except AdapterUnavailable as exc:
                return str(exc)
        return None

    def _checked(self, name: str) -> tuple[Any, Any]:
        """The stored adapter ``name`` and its declared info, checked against the model."""
        stored = self.store.get(self.entry, name)
        if stored is None:
            raise AdapterUnavailable(name, f"model {self.entry.name!r} has no adapter of that name (removed?)")
        if stored.problem is not None or stored.info is None:
            raise AdapterUnavailable(name, stored.problem or "unreadable")
        problem = fit_problem(stored.info, self.shapes, self.max_rank) if self.shapes is not None else None
        if problem is None and stored.info.rank > self.max_rank:
            problem = f"rank {stored.info.rank} is over this model's maximum of {self.max_rank} (adapters.max_rank)"
        if problem is not None:
            self._refuse(name, stored.info.fingerprint, problem)
            raise AdapterUnavailable(name, problem)
        return stored, stored.info

    def _refuse(self, name: str, fingerprint: str, problem: str) -> None:
        with self._lock:
            known = self._unusable.get(name)
            self._unusable[name] = {"fingerprint": fingerprint, "problem": problem}
        if known is None or known["fingerprint"] != fingerprint:
            log.warning("adapter %r of model %s refused: %s", name, self.entry.name, problem)

    def select(self, per_image: Sequence[Sequence[AdapterUse]]) -> float:
        """Load what the call's images name (``per_image``: each image's adapters) and select them in
        the bank; the seconds spent loading. :class:`AdapterUnavailable` names one that cannot be used."""
        needed = list(dict.fromkeys(u.name for uses in per_image for u in uses))
        if len(needed) > self.slots:
            raise ValueError(f"a call of {len(needed)} adapters over {self.slots} slots (the batch is split first)")
        t0 = time.perf_counter()
        loaded_any = False
        for name in needed:
            loaded_any |= self._ensure(name, keep=needed)
        load_s = time.perf_counter() - t0 if loaded_any else 0.0
        if self.bank is not None:
            slot_of = {n: self._resident[n].slot for n in needed}
            self.bank.select([[(slot_of[u.name], u.scale) for u in uses] for uses in per_image])
        return load_s

    def release(self) -> None:
        """After a call: the bank adds nothing until the next :meth:`select`."""
        if self.bank is not None:
            self.bank.release()

    def _ensure(self, name: str, keep: Sequence[str]) -> bool:
        """``name`` in a slot (its current file version); True when it had to be loaded."""
        stored, info = self._checked(name)
        here = self._resident.get(name)
        if here is not None and here.fingerprint == info.fingerprint:
            with self._lock:
                self._resident.move_to_end(name)
            return False
        slot = here.slot if here is not None else self._free_slot(keep)
        t0 = time.perf_counter()
        try:
            self._load_into(slot, stored, name)
        except AdapterUnavailable:
            self._forget(name)
            raise
        metrics.ADAPTER_LOAD.labels(self.entry.name).observe(time.perf_counter() - t0)
        with self._lock:
            self._resident[name] = _Resident(slot, info.fingerprint)
            self._resident.move_to_end(name)
            self._unusable.pop(name, None)
        metrics.ADAPTERS_LOADED.labels(self.entry.name, self.worker_id).set(len(self._resident))
        log.info("adapter %r of model %s loaded into slot %d in %.3fs", name, self.entry.name, slot,
                 time.perf_counter() - t0)
        return True

    def _load_into(self, slot: int, stored: Any, name: str) -> None:
        try:
            if self.bank is None:
                inspect_adapter(stored.path, name, self.store.max_bytes)
            else:
                self.bank.load(slot, stored.path, name, self.store.max_bytes)
        except (AdapterFileError, ValueError) as exc:
            fingerprint = stored.info.fingerprint if stored.info else ""
            self._refuse(name, fingerprint, str(exc))
            raise AdapterUnavailable(name, str(exc)) from None

    def _free_slot(self, keep: Sequence[str]) -> int:
        used = {r.slot for r in self._resident.values()}
        for slot in range(1, self.slots + 1):
            if slot not in used:
                return slot
        for name, r in self._resident.items():  # least recently used first
            if name not in keep and name not in self.pins:
                self._forget(name)
                return r.slot
        for name, r in self._resident.items():  # only pins left to evict: a pin is a preference, not a lock
            if name not in keep:
                log.warning("adapter slots of model %s are all pinned; evicting pin %r", self.entry.name, name)
                self._forget(name)
                return r.slot
        raise ValueError("no adapter slot to free")

    def _forget(self, name: str) -> None:
        with self._lock:
            r = self._resident.pop(name, None)
        if r is not None and self.bank is not None:
            self.bank.clear(r.slot)
        metrics.ADAPTERS_LOADED.labels(self.entry.name, self.worker_id).set(len(self._resident))

    def load_pins(self) -> None:
        """Load the pinned adapters now (start-up), so that no request pays for them; a pin that cannot
        be loaded is logged and reported like any adapter that does not fit."""
        for name in self.pins[: self.slots]:
            try:
                self._ensure(name, keep=self.pins)
            except AdapterUnavailable as exc:
                log.warning("pinned %s", exc)

    def check_all(self) -> None:
        """Check every adapter of the store against the model, so that ``GET /models`` marks the ones that
        do not fit before a request names them."""
        for stored in self.store.list(self.entry):
            if stored.usable:
                try:
                    self._checked(stored.name)
                except AdapterUnavailable:
                    pass

    def describe(self) -> dict[str, Any]:
        """For the heartbeat: the slots, what is loaded, and what was refused (by file version)."""
        with self._lock:
            return {"adapter_slots": self.slots, "adapters_loaded": list(self._resident),
                    "adapters_unusable": {k: dict(v) for k, v in self._unusable.items()}}


def slots_within(slots: int, slot_bytes: int, budget_mb: float) -> int:
    """How many of ``slots`` slots of ``slot_bytes`` each fit the memory budget (at least one)."""
    if slot_bytes <= 0:
        return slots
    return max(1, min(slots, int(budget_mb * (1 << 20) // slot_bytes)))
