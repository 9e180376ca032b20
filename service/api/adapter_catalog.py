"""A request's adapters checked against the store, and what GET /models says of each adapter.

An adapter is usable when its files read whole and declare a LoRA (:mod:`service.adapters.files`)
and no live worker of its model refused it: a worker checks each adapter's layers against its
model and says in its heartbeat which ones do not fit (``adapters_unusable``, by file version).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from service import metrics
from service.adapters.store import AdapterStore, StoredAdapter
from service.contract import AdapterUse
from service.registry import ModelEntry
from service.api.errors import ApiError

# How long the workers' verdicts read from Redis are reused: requests must not cost a read each.
VERDICTS_TTL_S = 1.0


def _bad(message: str, **extra: Any) -> ApiError:
    return ApiError(422, "validation_error", f"adapters: {message}", param="adapters",
                    fields=[{"field": "adapters", "message": message}], **extra)


class AdapterCatalog:
    """The API's view of every model's adapters: the store, and the verdicts of live workers."""

    def __init__(self, store: AdapterStore, queue: Any, models: Sequence[str]):
        self.store = store
        self.queue = queue
        self.models = list(models)
        self._verdicts: dict[str, dict[str, dict[str, str]]] = {}
        self._read_at = -1e9

    async def verdicts(self) -> dict[str, dict[str, dict[str, str]]]:
        """``{model: {adapter: {"fingerprint": ..., "problem": ...}}}`` of what live workers refused."""
        if time.monotonic() - self._read_at < VERDICTS_TTL_S:
            return self._verdicts
        out: dict[str, dict[str, dict[str, str]]] = {}
        for w in await self.queue.live_workers(self.models):
            for model, info in w.models.items():
                refused = info.get("adapters_unusable")
                if isinstance(refused, dict):
                    for name, v in refused.items():
                        if isinstance(v, dict) and isinstance(v.get("problem"), str):
                            out.setdefault(model, {})[str(name)] = {"fingerprint": str(v.get("fingerprint", "")),
                                                                    "problem": v["problem"][:500]}
        self._verdicts, self._read_at = out, time.monotonic()
        return out

    async def listing(self, entry: ModelEntry) -> list[tuple[StoredAdapter, str | None]]:
        """Each adapter of the model with why it does not load (None: it loads)."""
        refused = (await self.verdicts()).get(entry.name, {})
        out = []
        for a in self.store.list(entry):
            out.append((a, a.problem or self._refused(a, refused)))
        return out

    @staticmethod
    def _refused(a: StoredAdapter, refused: dict[str, dict[str, str]]) -> str | None:
        v = refused.get(a.name)
        if v is None or a.info is None or v["fingerprint"] != a.info.fingerprint:
            return None  # refused in another version: this one is checked when it loads
        return v["problem"]

    async def check(self, entry: ModelEntry, asked: Sequence[Any] | None) -> tuple[AdapterUse, ...]:
        """The request's adapters as the contract holds them, or a 422 naming what is wrong."""
        if not asked:
            return ()
        uses = tuple(AdapterUse(a.name, float(a.scale)) for a in asked)
        if not entry.serves_adapters:
            raise _bad(f"model {entry.name!r} serves no adapters")
        limit = entry.adapters.max_per_request
        if len(uses) > limit:
            raise _bad(f"{len(uses)} adapters; model {entry.name!r} takes at most {limit} per request")
        names = [u.name for u in uses]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise _bad(f"{', '.join(map(repr, twice))} named more than once")
        listing = await self.listing(entry)
        by_name = {a.name: (a, problem) for a, problem in listing}
        known = [a.name for a, problem in listing if problem is None]
        for u in uses:
            if u.name not in by_name:
                raise _bad(f"model {entry.name!r} has no adapter {u.name!r}; its adapters: "
                           f"{', '.join(known) or 'none'}", known_adapters=known)
            problem = by_name[u.name][1]
            if problem is not None:
                raise _bad(f"adapter {u.name!r} of model {entry.name!r} cannot be used: {problem}",
                           known_adapters=known)
        return uses


def count_requests(model: str, uses: Sequence[AdapterUse]) -> None:
    """One more request for each adapter of a queued job (metrics: per adapter, bounded labels)."""
    for u in uses:
        metrics.adapter_requests(model, u.name).inc()
