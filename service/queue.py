"""Redis Streams job queue: the producer side (API, asyncio) and the consumer side (worker).

Layout in Redis (all keys under ``clusca:``)::

    stream:{model}        one stream per model; entries carry only the job id
    job:{id}              hash: status, request (JSON), timestamps, step/steps, attempts,
                          result (JSON), error, cancel flag
    job:{id}:events       stream of JSON events (queued, started, progress, finished...)
    job:{id}:images       hash: image index -> encoded bytes
    job:{id}:done         list that gets one element when the job ends (wakes sync waiters)
    idem:{hash}           idempotency key -> "<job id> <request fingerprint>"
    workers:{model}       sorted set: worker id -> last heartbeat (unix seconds)
    worker:{id}           hash: what a worker holds, with a short TTL

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
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from .contract import EVENTS_MAXLEN, FINAL_EVENT, GROUP, QUEUED, TERMINAL, TERMINAL_EVENTS, JobRecord, JobRequest, JobResult

__all__ = ["GROUP", "EVENTS_MAXLEN", "TERMINAL", "JobQueue", "WorkerQueue", "Delivery", "StartedJob", "LiveWorker",
           "QueueFull", "IdempotencyMismatch"]
from .lua import SCRIPTS

log = logging.getLogger("clusca.queue")

PREFIX = "clusca:"
HEARTBEAT_S = 1.0
# A worker counts as alive while its last heartbeat is younger than this.
ALIVE_WINDOW_S = 5.0


def stream_key(model: str) -> str:
    return f"{PREFIX}stream:{model}"


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def events_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:events"


def images_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:images"


def done_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:done"


def workers_key(model: str) -> str:
    return f"{PREFIX}workers:{model}"


def worker_key(worker_id: str) -> str:
    return f"{PREFIX}worker:{worker_id}"


def new_job_id() -> str:
    return uuid.uuid4().hex


def _s(v: Any) -> Any:
    # Replace undecodable bytes: a foreign value in Redis must be refused, never crash a reader.
    return v.decode(errors="replace") if isinstance(v, (bytes, bytearray)) else v


_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def _job_id(fields: dict) -> str | None:
    raw = fields.get(b"job", fields.get("job"))
    job_id = _s(raw) if raw is not None else None
    return job_id if isinstance(job_id, str) and _JOB_ID.match(job_id) else None


class QueueFull(Exception):
    def __init__(self, depth: int):
        super().__init__(f"queue full ({depth} jobs waiting)")
        self.depth = depth


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
    """What the API does with the queue (``redis.asyncio`` client)."""

    def __init__(self, redis: Any, *, max_queue: int, ttl_s: int):
        self.r = redis
        self.max_queue = max_queue
        self.ttl_s = ttl_s
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
        job_id = new_job_id()
        idem = f"{PREFIX}idem:{idempotency}" if idempotency else ""
        res = await self._enqueue(
            keys=[stream_key(model), job_key(job_id), events_key(job_id), idem],
            args=[job_id, repr(time.time()), request.to_json(), model,
                  self.max_queue, self.ttl_s, request.steps, event_json(QUEUED, model=model), fingerprint])
        tag, value = _s(res[0]), _s(res[1])
        if tag == "full":
            raise QueueFull(int(value))
        if tag == "mismatch":
            raise IdempotencyMismatch(value)
        return value, tag == "ok"

    async def get(self, job_id: str) -> JobRecord | None:
        return JobRecord.from_hash(await self.r.hgetall(job_key(job_id)))

    async def image(self, job_id: str, index: int) -> bytes | None:
        return await self.r.hget(images_key(job_id), str(index))

    async def images(self, job_id: str) -> list[bytes]:
        raw = await self.r.hgetall(images_key(job_id))
        return _ordered_images(raw)

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
        for raw in (await self.r.mget([worker_key(k) for k in keys])) if keys else []:
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

    def ensure_groups(self) -> None:
        for m in self.models:
            try:
                self.r.xgroup_create(stream_key(m), GROUP, id="0", mkstream=True)
            except Exception as exc:  # noqa: BLE001
                if "BUSYGROUP" not in str(exc):
                    raise

    def read(self, count: int, block_ms: int) -> list[Delivery]:
        """New entries for this worker's models (at most ``count``)."""
        res = self.r.xreadgroup(GROUP, self.worker_id, {stream_key(m): ">" for m in self.models},
                                count=count, block=block_ms if block_ms > 0 else None)
        out = []
        for stream, entries in res or []:
            model = _s(stream)[len(PREFIX) + len("stream:"):]
            for entry_id, fields in entries:
                if not fields:
                    continue
                job_id = _job_id(fields)
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
                job_id = _job_id(fields)
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
        pipe = self.r.pipeline(transaction=False)
        for d in deliveries:
            pipe.hget(job_key(d.job_id), "request")
        return [JobRequest.parse(v) if v else None for v in pipe.execute()]

    def start(self, deliveries: list[Delivery]) -> tuple[list[StartedJob], list[tuple[Delivery, str]]]:
        """Mark jobs running (counting attempts). Returns started jobs and skipped ones with why."""
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        for d in deliveries:
            self._start(keys=[job_key(d.job_id), events_key(d.job_id), done_key(d.job_id), stream_key(d.model)],
                        args=[self.worker_id, repr(now), self.max_attempts, self.ttl_s, d.entry_id], client=pipe)
        started, skipped = [], []
        for d, res in zip(deliveries, pipe.execute()):
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

    def progress(self, items: list[tuple[list[StartedJob], int, int, list[bool]]]) -> None:
        """Store ``(jobs, step, steps, cancelled)`` items in one round trip; set the cancel flags read back.

        One progress event per job and step, in order; each job's ``step`` field and cancel
        flag are written and read once, for its latest step.
        """
        pipe = self.r.pipeline(transaction=False)
        latest: dict[str, tuple[int, list[bool], int]] = {}
        for jobs, step, steps, cancelled in items:
            ev = event_json("progress", step=step, steps=steps)
            for idx, j in enumerate(jobs):
                pipe.xadd(events_key(j.delivery.job_id), {"e": ev}, maxlen=EVENTS_MAXLEN, approximate=True)
                latest[j.delivery.job_id] = (step, cancelled, idx)
        if not latest:
            return
        for job_id, (step, _, _) in latest.items():
            pipe.hset(job_key(job_id), "step", step)
            pipe.hget(job_key(job_id), "cancel")
        res = pipe.execute()
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
        res = self._finish(keys=[job_key(d.job_id), events_key(d.job_id), images_key(d.job_id),
                                 done_key(d.job_id), stream_key(d.model)],
                           args=[status, repr(time.time()), result.to_json(),
                                 error, self.ttl_s, d.entry_id, ev, "" if step is None else int(step),
                                 len(progress), *progress, *images])
        return bool(res)

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
