"""Redis Streams job queue: the producer side (API, asyncio) and the consumer side (worker).

Where each key lives is :mod:`service.keys` (one hash tag per model, so the same
scripts run on one server and on Redis Cluster); how a client is made from
``REDIS_URL`` is :mod:`service.redis_conn`.

What a job holds is :mod:`service.contract` (requests, results, statuses), which also
names the consumer group and caps the Lua scripts (:mod:`service.lua`) use.
Everything stored is JSON or raw image bytes; nothing is ever unpickled. State changes
that must not race (enqueue with depth check and idempotency, start with attempt
counting, finish exactly once with acknowledgement, cancel) are single Lua scripts, so
two workers that both ran a job after a takeover cannot both store a result.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, TypeVar

from redis.exceptions import AskError, NoScriptError, TryAgainError

from .contract import EVENTS_MAXLEN, FINAL_EVENT, GROUP, QUEUED, TERMINAL, TERMINAL_EVENTS, JobRecord, JobRequest, JobResult
from .keys import (JOB_ID, check_layout, done_key, events_key, idem_key, idem_owner_key, images_key, job_belongs_to, job_key, job_tag,
                   new_job_id, stream_key, worker_key, workers_key)
from .redis_conn import UNAVAILABLE, is_cluster
from .slot_route import SlotRoute

__all__ = ["GROUP", "EVENTS_MAXLEN", "TERMINAL", "JobQueue", "WorkerQueue", "Delivery", "StartedJob", "LiveWorker",
           "QueueFull", "IdempotencyMismatch", "NotReplicated", "new_job_id", "stream_key", "job_key", "events_key",
           "images_key", "done_key", "workers_key", "worker_key"]
from .lua import SCRIPTS

log = logging.getLogger("clusca.queue")
T = TypeVar("T")

HEARTBEAT_S = 1.0
# A worker counts as alive while its last heartbeat is younger than this.
ALIVE_WINDOW_S = 5.0
# How often a worker whose streams span several cluster slots polls them (one blocking read
# cannot wait on keys of different slots).
SPREAD_POLL_S = 0.005
# A script call whose node could not be reached: it runs again through the cluster client.
_AGAIN = object()


def _s(v: Any) -> Any:
    # Replace undecodable bytes: a foreign value in Redis must be refused, never crash a reader.
    return v.decode(errors="replace") if isinstance(v, (bytes, bytearray)) else v


def _job_id(fields: dict, model: str) -> str | None:
    raw = fields.get(b"job", fields.get("job"))
    job_id = _s(raw) if raw is not None else None
    # An id of another model's tag would name keys in another slot: never the API's doing.
    ok = isinstance(job_id, str) and JOB_ID.match(job_id) and job_belongs_to(job_id, model)
    return job_id if ok else None


class QueueFull(Exception):
    def __init__(self, depth: int):
        super().__init__(f"queue full ({depth} jobs waiting)")
        self.depth = depth


class NotReplicated(Exception):
    """The job is queued on the primary, but no replica confirmed it in time (``wait_replicas``)."""

    def __init__(self, job_id: str, acked: int, wanted: int):
        super().__init__(f"job {job_id}: {acked} of {wanted} replica(s) confirmed it")
        self.job_id = job_id


class IdempotencyMismatch(Exception):
    """The idempotency key was already used for a different request."""

    def __init__(self, job_id: str):
        super().__init__(f"the idempotency key belongs to job {job_id}, made from another request")
        self.job_id = job_id


def _ordered_images(raw: dict) -> list[bytes]:
    """Image bytes by index; fields that are not indexes were not written here and are ignored."""
    indexed = {int(_s(k)): v for k, v in raw.items() if _s(k).isdigit()}
    return [indexed[i] for i in sorted(indexed)]


def event_json(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, "t": time.time(), **fields}, separators=(",", ":"))


@dataclass(frozen=True)
class LiveWorker:
    """A worker whose heartbeat is recent, as it describes itself."""

    id: str | None
    host: str | None
    running: int | None
    models: dict[str, dict[str, Any]]


# ---------------------------------------------------------------------------- producer side
class JobQueue:
    """What the API does with the queue (``redis.asyncio`` client, any :mod:`service.redis_conn` mode).

    ``wait_replicas`` > 0 confirms a new job only once that many replicas hold it (Redis
    ``WAIT`` after the enqueue script, on the same connection), so a failover to one of
    them cannot lose it; ``journal`` (an :class:`~service.reconcile.AckJournal`) hears of
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
                      fingerprint: str = "") -> tuple[str, bool]:
        """Queue a job; return ``(job_id, created)``. ``created`` is False for an idempotent repeat.

        ``fingerprint`` (no spaces) identifies the request behind an idempotency key: a repeat
        with another fingerprint raises :class:`IdempotencyMismatch` and queues nothing.
        """
        if " " in fingerprint:
            raise ValueError("fingerprint must not contain spaces")
        job_id = new_job_id(model)
        if idempotency:
            await self._claim_key(model, idempotency)
        keys = [stream_key(model), job_key(job_id), events_key(job_id)] + ([idem_key(model, idempotency)] if idempotency else [])
        args = [job_id, repr(time.time()), request.to_json(), model, self.max_queue, self.ttl_s, request.steps,
                event_json(QUEUED, model=model), fingerprint]
        if self.wait_replicas:
            res, acked = await self._enqueue_replicated(keys, args)
        else:
            res, acked = await self._enqueue(keys=keys, args=args), None
        tag, value = _s(res[0]), _s(res[1])
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
        first = _s(await self.r.get(owner))
        if first is not None and first != model:
            held = _s(await self.r.get(idem_key(first, idempotency)))
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

    async def get(self, job_id: str) -> JobRecord | None:
        return JobRecord.from_hash(await self.r.hgetall(job_key(job_id)))

    async def image(self, job_id: str, index: int) -> bytes | None:
        return await self.r.hget(images_key(job_id), str(index))

    async def images(self, job_id: str) -> list[bytes]:
        raw = await self.r.hgetall(images_key(job_id))
        return _ordered_images(raw)

    async def delete(self, job_id: str) -> list[bytes]:
        """Remove a job's records and outputs (call it once the job has ended); return the outputs
        it held, so that a video store can remove files they refer to."""
        outputs = list((await self.r.hgetall(images_key(job_id))).values())
        await self.r.delete(images_key(job_id), job_key(job_id), events_key(job_id), done_key(job_id))
        return outputs

    async def cancel(self, job_id: str) -> str:
        res = await self._cancel(keys=[job_key(job_id), events_key(job_id), done_key(job_id)],
                                 args=[repr(time.time()), self.ttl_s])
        return _s(res)

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
        images = _ordered_images(raw_images)
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
                last_id = _s(entry_id)
                event = json.loads(_s(fields[b"e"] if b"e" in fields else fields["e"]))
                yield last_id, event
                if event.get("type") in TERMINAL_EVENTS:
                    return

    async def depth(self, model: str) -> int:
        """Jobs waiting (not yet delivered to a worker) for ``model``."""
        length = await self.r.xlen(stream_key(model))
        return max(0, length - await self.running(model))

    async def running(self, model: str) -> int:
        try:
            info = await self.r.xpending(stream_key(model), GROUP)
        except Exception:  # noqa: BLE001 - no group yet means nothing is running
            return 0
        return int(info.get("pending", 0) if isinstance(info, dict) else 0)

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
            ids.update(_s(m) for m in await self.r.zrangebyscore(workers_key(name), time.time() - ALIVE_WINDOW_S,
                                                                 "+inf"))
        keys = sorted(ids)
        out = []
        # One GET per worker in a pipeline, not MGET: worker records live in different cluster slots.
        pipe = self.r.pipeline(transaction=False)
        for k in keys:
            pipe.get(worker_key(k))
        for raw in (await pipe.execute()) if keys else []:
            try:
                info = json.loads(_s(raw)) if raw else None
            except ValueError:
                info = None
            if isinstance(info, dict):
                models_info = info.get("models") if isinstance(info.get("models"), dict) else {}
                out.append(LiveWorker(info.get("id"), info.get("host"), info.get("running"),
                                      {m: w for m, w in models_info.items() if isinstance(w, dict)}))
        return out


# ---------------------------------------------------------------------------- consumer side
@dataclass
class Delivery:
    """One stream entry handed to this worker."""

    model: str
    entry_id: str
    job_id: str


@dataclass
class StartedJob:
    """A job this worker marked running: its request, and what the start script said."""

    delivery: Delivery
    request: JobRequest
    created: float
    started: float
    attempt: int
    cancel_requested: bool


class WorkerQueue:
    """What a worker does with the queue (synchronous ``redis`` client)."""

    def __init__(self, redis: Any, *, worker_id: str, models: list[str], ttl_s: int,
                 visibility_timeout_s: float, max_attempts: int):
        self.r = redis
        self.worker_id = worker_id
        self.models = list(models)
        self.ttl_s = ttl_s
        self.visibility_ms = int(visibility_timeout_s * 1000)
        self.max_attempts = max_attempts
        self._start = redis.register_script(SCRIPTS["start"])
        self._finish = redis.register_script(SCRIPTS["finish"])
        self._release = redis.register_script(SCRIPTS["release"])
        # Where the next reclaim scan of each stream's pending list starts (see reclaim()).
        self._reclaim_from: dict[str, str] = {}
        self._model_of = {stream_key(m): m for m in self.models}
        self._cluster = is_cluster(redis)
        self._read_groups = _by_slot([stream_key(m) for m in self.models], self._cluster)
        self._route = SlotRoute(redis)

    def ensure_groups(self) -> None:
        """Check the key layout (:func:`~service.keys.check_layout`), then create missing consumer groups."""
        check_layout(self.r, self.models)
        for m in self.models:
            try:
                self.r.xgroup_create(stream_key(m), GROUP, id="0", mkstream=True)
            except Exception as exc:  # noqa: BLE001
                if "BUSYGROUP" not in str(exc):
                    raise

    def read(self, count: int, block_ms: int) -> list[Delivery]:
        """New entries for this worker's models (at most ``count``)."""
        groups = self._read_groups
        if len(groups) == 1:
            res = self._read(groups[0], count, block_ms if block_ms > 0 else None)
            return self._deliveries(res, count)
        # Streams in several cluster slots: poll each slot's streams until one has work.
        deadline = time.monotonic() + block_ms / 1000
        while True:
            out: list[Delivery] = []
            for streams in groups:
                out += self._deliveries(self._read(streams, count - len(out), None), count - len(out))
                if len(out) >= count:
                    return out
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(SPREAD_POLL_S)

    def _read(self, streams: dict[str, str], count: int, block_ms: int | None) -> Any:
        # Straight to the slot's primary: the cluster client would ask the server for XREADGROUP's keys first.
        return self._route.call(next(iter(streams)), lambda c: c.xreadgroup(GROUP, self.worker_id, streams,
                                                                            count=count, block=block_ms))

    def _deliveries(self, res: Any, count: int) -> list[Delivery]:
        out = []
        for stream, entries in res or []:
            model = self._model_of[_s(stream)]
            for entry_id, fields in entries:
                if not fields:
                    continue
                job_id = _job_id(fields, model)
                if job_id is None:
                    self.discard(model, _s(entry_id))
                    continue
                out.append(Delivery(model, _s(entry_id), job_id))
        return out[:count] if len(out) > count else out

    def discard(self, model: str, entry_id: str) -> None:
        """Drop a stream entry the API did not write (it names no job): acknowledged and deleted, never run."""
        log.warning("discarding malformed entry %s in the %s stream", entry_id, model)
        self.r.xack(stream_key(model), GROUP, entry_id)
        self.r.xdel(stream_key(model), entry_id)

    def reclaim(self, count: int) -> list[Delivery]:
        """Entries another worker held longer than the visibility timeout without finishing.

        XAUTOCLAIM looks at a bounded window of the pending list per call, so each call goes on
        from where the previous one stopped: a dead worker's entries are found however many
        live entries precede them.
        """
        out: list[Delivery] = []
        for m in self.models:
            if len(out) >= count:
                break
            res = self.r.xautoclaim(stream_key(m), GROUP, self.worker_id, self.visibility_ms,
                                    start_id=self._reclaim_from.get(m, "0-0"), count=count - len(out))
            self._reclaim_from[m] = _s(res[0]) if res else "0-0"
            for item in res[1] if res else []:
                if not item:
                    continue
                entry_id, fields = item
                if not fields:  # deleted entry still in the pending list
                    self.r.xack(stream_key(m), GROUP, entry_id)
                    continue
                job_id = _job_id(fields, m)
                if job_id is None:
                    self.discard(m, _s(entry_id))
                    continue
                out.append(Delivery(m, _s(entry_id), job_id))
        return out

    def touch(self, deliveries: list[Delivery]) -> None:
        """Reset the idle time of entries this worker still works on (it is alive, not stuck)."""
        by_model: dict[str, list[str]] = {}
        for d in deliveries:
            by_model.setdefault(d.model, []).append(d.entry_id)
        for m, ids in by_model.items():
            self.r.xclaim(stream_key(m), GROUP, self.worker_id, 0, ids, justid=True)

    def peek_requests(self, deliveries: list[Delivery]) -> list[JobRequest | None]:
        def run(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for d in deliveries:
                pipe.hget(job_key(d.job_id), "request")
            return pipe.execute()

        return [JobRequest.parse(v) if v else None for v in self._one_slot([d.job_id for d in deliveries], run)]

    def _one_slot(self, job_ids: list[str], run: Callable[[Any], T]) -> T:
        """``run(client)``: on the primary of the jobs' slot when they share one (a batch is of one
        model), else through the client itself (on a cluster, its pipeline splits by slot)."""
        if self._cluster and job_ids and all(job_tag(j) == job_tag(job_ids[0]) for j in job_ids):
            return self._route.call(job_key(job_ids[0]), run)
        return run(self.r)

    def start(self, deliveries: list[Delivery]) -> tuple[list[StartedJob], list[tuple[Delivery, str]]]:
        """Mark jobs running (counting attempts). Returns started jobs and skipped ones with why."""
        now = time.time()
        calls = [dict(keys=[job_key(d.job_id), events_key(d.job_id), done_key(d.job_id), stream_key(d.model)],
                      args=[self.worker_id, repr(now), self.max_attempts, self.ttl_s, d.entry_id]) for d in deliveries]
        replies = self._scripts(self._start, calls)
        started, skipped = [], []
        for d, res in zip(deliveries, replies):
            tag = _s(res[0])
            if tag == "ok":
                req = JobRequest.parse(res[1])
                try:
                    created = float(_s(res[2]))
                except (TypeError, ValueError):
                    created, req = now, None
                if req is None:
                    # Only the delivery matters to finish(); the request stands in for the unreadable one.
                    job = StartedJob(d, JobRequest("", 1, 1, 1, 0.0, 0), created, now, int(_s(res[4])), False)
                    self.finish(job, "failed", JobResult(), "the stored request is not a valid job; it was not run")
                    skipped.append((d, "invalid request"))
                else:
                    started.append(StartedJob(d, req, created, now, int(_s(res[4])), _s(res[3]) == "1"))
            else:
                skipped.append((d, tag if len(res) < 2 else f"{tag}: {_s(res[1])}"))
        return started, skipped

    def _scripts(self, script: Any, calls: list[dict]) -> list[Any]:
        """Run ``script`` once per call (``keys``, ``args``) in as few round trips as the mode allows."""
        if not self._cluster:
            pipe = self.r.pipeline(transaction=False)
            for call in calls:
                script(**call, client=pipe)
            return pipe.execute()
        # A cluster pipeline refuses scripts: one plain pipeline per primary instead, straight to
        # the node. A slot that moved (MOVED) ran nothing there and runs again through the cluster
        # client, which follows it; so does everything when a node is unreachable, which is
        # how the cluster client learns of a failover.
        replies: list[Any] = [None] * len(calls)
        by_node: dict[str, tuple[Any, list[int]]] = {}
        for i, call in enumerate(calls):
            node = self.r.get_node_from_key(call["keys"][0])
            by_node.setdefault(node.name, (node, []))[1].append(i)
        try:
            for node, idxs in by_node.values():
                pipe = node.redis_connection.pipeline(transaction=False)
                for i in idxs:
                    script(**calls[i], client=pipe)
                for i, reply in zip(idxs, pipe.execute(raise_on_error=False)):
                    replies[i] = reply
        except UNAVAILABLE:
            replies = [_AGAIN if r is None else r for r in replies]
        for i, reply in enumerate(replies):
            if reply is _AGAIN or isinstance(reply, (AskError, NoScriptError, TryAgainError)):
                replies[i] = script(**calls[i])
            elif isinstance(reply, Exception):
                raise reply
        return replies

    def progress(self, items: list[tuple[list[StartedJob], int, int, list[bool]]]) -> None:
        """Store ``(jobs, step, steps, cancelled)`` items in one round trip; set the cancel flags read back.

        One progress event per job and step, in order; each job's ``step`` field and cancel
        flag are written and read once, for its latest step.
        """
        latest: dict[str, tuple[int, list[bool], int]] = {}
        for jobs, step, _, cancelled in items:
            for idx, j in enumerate(jobs):
                latest[j.delivery.job_id] = (step, cancelled, idx)
        if not latest:
            return

        def run(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for jobs, step, steps, _ in items:
                ev = event_json("progress", step=step, steps=steps)
                for j in jobs:
                    pipe.xadd(events_key(j.delivery.job_id), {"e": ev}, maxlen=EVENTS_MAXLEN, approximate=True)
            for job_id, (step, _, _) in latest.items():
                pipe.hset(job_key(job_id), "step", step)
                pipe.hget(job_key(job_id), "cancel")
            return pipe.execute()

        res = self._one_slot(list(latest), run)
        flags = res[len(res) - 2 * len(latest) + 1::2]  # the HGET replies, after every XADD
        for (_, cancelled, idx), flag in zip(latest.values(), flags):
            if _s(flag) == "1":
                cancelled[idx] = True

    def finish(self, job: StartedJob, status: str, result: JobResult, error: str = "",
               images: list[bytes] = (), progress: list[str] = (), step: int | None = None) -> bool:
        """Store the outcome and acknowledge, atomically; False if another worker finished it first.

        ``progress`` (event JSON strings) go into the job's event stream before its final
        event, and ``step`` into its ``step`` field, in the same round trip; a job that was
        already finished gets neither.
        """
        d = job.delivery
        ev = event_json(FINAL_EVENT[status], status=status, error=error or None, images=len(images))
        keys = [job_key(d.job_id), events_key(d.job_id), images_key(d.job_id), done_key(d.job_id), stream_key(d.model)]
        args = [status, repr(time.time()), result.to_json(), error, self.ttl_s, d.entry_id, ev,
                "" if step is None else int(step), len(progress), *progress, *images]
        return bool(self._route.call(keys[0], lambda c: self._finish(keys=keys, args=args, client=c)))

    def release(self, deliveries: list[Delivery]) -> None:
        """Hand unstarted jobs back to the queue (they go to the end of their stream)."""
        for d in deliveries:
            self._release(keys=[stream_key(d.model), job_key(d.job_id)], args=[d.entry_id, d.job_id])

    def heartbeat(self, info: dict[str, Any]) -> None:
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        for m in self.models:
            pipe.zadd(workers_key(m), {self.worker_id: now})
            pipe.zremrangebyscore(workers_key(m), "-inf", now - 3600)
        pipe.set(worker_key(self.worker_id), json.dumps({**info, "t": now}), ex=int(ALIVE_WINDOW_S * 2))
        pipe.execute()

    def leave(self) -> None:
        pipe = self.r.pipeline(transaction=False)
        for m in self.models:
            pipe.zrem(workers_key(m), self.worker_id)
        pipe.delete(worker_key(self.worker_id))
        pipe.execute()


def _by_slot(keys: list[str], cluster: bool) -> list[dict[str, str]]:
    """XREADGROUP arguments: one read for all streams, or on a cluster one per slot."""
    if not cluster:
        return [{k: ">" for k in keys}]
    from redis.crc import key_slot

    groups: dict[int, dict[str, str]] = {}
    for k in keys:
        groups.setdefault(key_slot(k.encode()), {})[k] = ">"
    return list(groups.values())
