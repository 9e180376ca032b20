"""The producer side of the Redis Streams queue: what the API does (asyncio client).

Enqueue with depth check and idempotency, cancel, results, events and liveness reads.
Where each key lives is :mod:`service.broker.keys` (one hash tag per model, so the same
scripts run on one server and on Redis Cluster); how a client is made from ``REDIS_URL``
is :mod:`service.broker.connect`; what a job holds is :mod:`service.contract`.
Everything stored is JSON or raw image bytes; nothing is ever unpickled. State changes
that must not race are single Lua scripts (:mod:`service.broker.lua`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, AsyncIterator, TypeVar

from redis.exceptions import AskError

from service.contract import GROUP, QUEUED, TERMINAL_EVENTS, JobRecord, JobRequest, as_text
from service.broker.keys import (done_key, events_key, idem_key, idem_owner_key, images_key, input_key, job_key, new_job_id, stream_key, stream_keys, worker_key, workers_key)
from service.broker.lanes import LANES, SHORT
from service.broker.connect import UNAVAILABLE, is_cluster
from service.broker.lua import SCRIPTS
from service.broker.wire import (ALIVE_WINDOW_S, IdempotencyMismatch, LiveWorker, NotReplicated, QueueFull, event_json, ordered_images)

T = TypeVar("T")

log = logging.getLogger("clusca.queue")


class JobQueue:
    """What the API does with the queue (``redis.asyncio`` client, any :mod:`service.broker.connect` mode).

    ``wait_replicas`` > 0 confirms a new job only once that many replicas hold it (Redis
    ``WAIT`` after the enqueue script, on the same connection), so a failover to one of
    them cannot lose it; ``journal`` (an :class:`~service.broker.reconcile.AckJournal`) hears of
    every job confirmed, to find later any that a failover lost anyway.
    """

    def __init__(self, redis: Any, *, max_queue: int, ttl_s: int, wait_replicas: int = 0,
                 wait_timeout_ms: int = 1000, journal: Any = None):
        self.r = redis
        self.max_queue = max_queue
        self.ttl_s = ttl_s
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.journal = journal
        self._cluster = is_cluster(redis)
        self._primaries: dict[tuple[str, int], Any] = {}
        self._retired: list[Any] = []
        self._enqueue = redis.register_script(SCRIPTS["enqueue"])
        self._cancel = redis.register_script(SCRIPTS["cancel"])

    async def enqueue(self, model: str, request: JobRequest, idempotency: str | None = None,
                      fingerprint: str = "", lane: str = SHORT) -> tuple[str, bool]:
        """Queue a job in ``model``'s ``lane`` (:func:`~service.broker.lanes.lane_of` picks it);
        return ``(job_id, created)``. ``created`` is False for an idempotent repeat.

        ``fingerprint`` (no spaces) identifies the request behind an idempotency key: a repeat
        with another fingerprint raises :class:`IdempotencyMismatch` and queues nothing. The
        depth limit counts the jobs of both lanes.
        """
        if " " in fingerprint:
            raise ValueError("fingerprint must not contain spaces")
        other = [stream_key(model, x) for x in LANES if x != lane]
        target = stream_key(model, lane)  # an unknown lane is a ValueError before anything is written
        job_id = new_job_id(model)
        if idempotency:
            await self._claim_key(model, idempotency)
        keys = ([target, *other, job_key(job_id), events_key(job_id)]
                + ([idem_key(model, idempotency)] if idempotency else []))
        args = [job_id, repr(time.time()), request.to_json(), model, self.max_queue, self.ttl_s, request.steps,
                event_json(QUEUED, model=model), fingerprint]
        if self.wait_replicas:
            res, acked = await self._enqueue_replicated(keys, args)
        else:
            res, acked = await self._enqueue(keys=keys, args=args), None
        tag, value = as_text(res[0]), as_text(res[1])
        if tag == "full":
            raise QueueFull(int(value))
        if tag == "mismatch":
            raise IdempotencyMismatch(value)
        if acked is not None and acked < self.wait_replicas:
            raise NotReplicated(value, acked, self.wait_replicas)
        if tag == "ok" and self.journal is not None:
            self.journal.add(value, model)
        return value, tag == "ok"

    async def _claim_key(self, model: str, idempotency: str) -> None:
        """Bind an idempotency key to its first model: the key itself lives in that model's slot,
        so a reuse for another model is caught here, by a key of its own."""
        owner = idem_owner_key(idempotency)
        if await self.r.set(owner, model, nx=True, ex=self.ttl_s):
            return
        first = as_text(await self.r.get(owner))
        if first is not None and first != model:
            held = as_text(await self.r.get(idem_key(first, idempotency)))
            raise IdempotencyMismatch(held.split(" ")[0] if held else "(expired)")

    async def _enqueue_replicated(self, keys: list[str], args: list[Any]) -> tuple[Any, int]:
        # WAIT counts the replicas that acknowledged this connection's writes, so the script and
        # the WAIT must share one connection: on a cluster, that of the slot's primary itself.
        for attempt in (0, 1):
            client = await self._primary_for(keys[0])
            pipe = client.pipeline(transaction=False)
            await self._enqueue(keys=keys, args=args, client=pipe)
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            try:
                res, acked = await pipe.execute()
                return res, int(acked)
            except UNAVAILABLE:
                if self._cluster:
                    await self._relearn(keys[0])
                raise
            except AskError:  # MOVED too: the slot has another primary now; nothing ran
                if not (self._cluster and attempt == 0):
                    raise
                await self._relearn(keys[0])
        raise AssertionError("unreachable")

    async def _relearn(self, key: str) -> None:
        """Forget the primaries known so far; a command through the cluster client makes it read the
        slot map again (after a failover, the next enqueue finds the promoted replica)."""
        # Other requests may be using these clients right now: retire them, close them at the end.
        self._retired += self._primaries.values()
        self._primaries.clear()
        try:
            await self.r.exists(key)
        except UNAVAILABLE:
            pass

    async def _primary_for(self, key: str) -> Any:
        if not self._cluster:
            return self.r
        import redis.asyncio as aioredis

        await self.r.initialize()  # a no-op once the slot map is known
        node = self.r.get_node_from_key(key)
        addr = (node.host, node.port)
        if addr not in self._primaries:
            kw = {k: v for k, v in node.connection_kwargs.items()
                  if k in ("username", "password", "socket_timeout", "socket_connect_timeout", "ssl")}
            self._primaries[addr] = aioredis.Redis(host=node.host, port=node.port, **kw)
        return self._primaries[addr]

    async def close(self) -> None:
        for client in [*self._primaries.values(), *self._retired]:
            await client.aclose()
        self._primaries.clear()
        self._retired.clear()

    async def put_input(self, model: str, digest: str, data: bytes) -> None:
        """Keep an edit's input for the result TTL (a repeat of the same bytes renews it)."""
        await self.r.set(input_key(model, digest), data, ex=self.ttl_s)

    async def get(self, job_id: str) -> JobRecord | None:
        return JobRecord.from_hash(await self.r.hgetall(job_key(job_id)))

    async def image(self, job_id: str, index: int) -> bytes | None:
        return await self.r.hget(images_key(job_id), str(index))

    async def images(self, job_id: str) -> list[bytes]:
        raw = await self.r.hgetall(images_key(job_id))
        return ordered_images(raw)

    async def delete(self, job_id: str) -> list[bytes]:
        """Remove a job's records and outputs (call it once the job has ended); return the outputs
        it held, so that a video store can remove files they refer to."""
        outputs = list((await self.r.hgetall(images_key(job_id))).values())
        await self.r.delete(images_key(job_id), job_key(job_id), events_key(job_id), done_key(job_id))
        return outputs

    async def cancel(self, job_id: str) -> str:
        res = await self._cancel(keys=[job_key(job_id), events_key(job_id), done_key(job_id)],
                                 args=[repr(time.time()), self.ttl_s])
        return as_text(res)

    async def wait_result(self, job_id: str, timeout_s: float) -> tuple[bool, JobRecord | None, list[bytes]]:
        """Wait for the job to end; return ``(ended, job, images)`` read in one round trip."""
        deadline = time.monotonic() + timeout_s
        marker = None
        while marker is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False, await self.get(job_id), []
            # Short slices keep each blocking call well inside the socket timeout.
            got = await self.r.blpop([done_key(job_id)], timeout=min(left, 2.0))
            marker = got[1] if got is not None else None
        pipe = self.r.pipeline(transaction=False)
        pipe.rpush(done_key(job_id), marker)  # for any other waiter on the same job
        pipe.hgetall(job_key(job_id))
        pipe.hgetall(images_key(job_id))
        _, raw_job, raw_images = await pipe.execute()
        images = ordered_images(raw_images)
        return True, JobRecord.from_hash(raw_job), images

    async def events(self, job_id: str, last_id: str = "0",
                     idle_s: float = 2.0) -> AsyncIterator[tuple[str, dict[str, Any]] | None]:
        """Yield ``(event_id, event)`` from ``last_id`` on until a terminal event; ``None`` when idle."""
        key = events_key(job_id)
        while True:
            res = await self.r.xread({key: last_id}, count=100, block=int(idle_s * 1000))
            if not res:
                if not await self.r.exists(job_key(job_id)):
                    return
                yield None
                continue
            for entry_id, fields in res[0][1]:
                last_id = as_text(entry_id)
                event = json.loads(as_text(fields[b"e"] if b"e" in fields else fields["e"]))
                yield last_id, event
                if event.get("type") in TERMINAL_EVENTS:
                    return

    async def depth(self, model: str) -> int:
        """Jobs waiting (not yet delivered to a worker) for ``model``, in both lanes."""
        pipe = self.r.pipeline(transaction=False)
        for key in stream_keys(model):
            pipe.xlen(key)
        length = sum(int(n) for n in await pipe.execute())
        return max(0, length - await self.running(model))

    async def running(self, model: str) -> int:
        """Jobs of ``model`` delivered to a worker and not yet finished, in both lanes."""
        total = 0
        for key in stream_keys(model):
            try:
                info = await self.r.xpending(key, GROUP)
            except Exception:  # noqa: BLE001 - no group yet means nothing is running
                continue
            total += int(info.get("pending", 0) if isinstance(info, dict) else 0)
        return total

    async def workers_alive(self, model: str) -> int:
        return int(await self.r.zcount(workers_key(model), time.time() - ALIVE_WINDOW_S, "+inf"))

    async def ping(self) -> bool:
        """Whether Redis answers (raises when it does not)."""
        return bool(await self.r.ping())

    async def live_workers(self, models: list[str]) -> list[LiveWorker]:
        """Workers of ``models`` with a recent heartbeat, as each describes itself.

        The ids come from the per-model heartbeat sets (never a keyspace scan: Redis holds
        every job's keys too), the details from each worker's own short-lived record.
        """
        ids: set[str] = set()
        for name in models:
            ids.update(as_text(m) for m in await self.r.zrangebyscore(workers_key(name), time.time() - ALIVE_WINDOW_S,
                                                                 "+inf"))
        keys = sorted(ids)
        out = []
        # One GET per worker in a pipeline, not MGET: worker records live in different cluster slots.
        pipe = self.r.pipeline(transaction=False)
        for k in keys:
            pipe.get(worker_key(k))
        for raw in (await pipe.execute()) if keys else []:
            try:
                info = json.loads(as_text(raw)) if raw else None
            except ValueError:
                info = None
            if isinstance(info, dict):
                models_info = info.get("models") if isinstance(info.get("models"), dict) else {}
                out.append(LiveWorker(info.get("id"), info.get("host"), info.get("running"),
                                      {m: w for m, w in models_info.items() if isinstance(w, dict)}))
        return out
