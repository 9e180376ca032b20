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

log = logging.getLogger("clusca.queue")

PREFIX = "clusca:"
GROUP = "workers"
TERMINAL = ("succeeded", "failed", "cancelled")
HEARTBEAT_S = 1.0
# A worker counts as alive while its last heartbeat is younger than this.
ALIVE_WINDOW_S = 5.0
EVENTS_MAXLEN = 2000


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
# Field -> accepted types of a stored job request (what the API writes; anything else is refused).
_REQUEST_FIELDS: dict[str, tuple[type, ...]] = {
    "prompt": (str,), "negative_prompt": (str, type(None)), "width": (int,), "height": (int,), "steps": (int,),
    "guidance": (int, float), "seed": (int,), "num_images": (int,), "output_format": (str,), "cache": (dict,),
    "webhook_url": (str, type(None))}


def parse_request(raw: Any) -> dict[str, Any] | None:
    """A stored job request as a dict, or None when it is not one the API could have written."""
    try:
        req = json.loads(_s(raw))
    except (TypeError, ValueError):
        return None
    if not isinstance(req, dict):
        return None
    for name, types in _REQUEST_FIELDS.items():
        v = req.get(name)
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            return None
    if req["output_format"] not in ("png", "jpeg", "webp") or min(req["width"], req["height"], req["steps"],
                                                                     req["num_images"]) < 1:
        return None
    return req


def _job_id(fields: dict) -> str | None:
    raw = fields.get(b"job", fields.get("job"))
    job_id = _s(raw) if raw is not None else None
    return job_id if isinstance(job_id, str) and _JOB_ID.match(job_id) else None


# KEYS: stream, job, events, idem ('' = none)
# ARGV: job_id, now, request_json, model, max_queue, ttl, steps, queued_event_json, fingerprint
# A key already used for another request (another fingerprint) is refused: 'mismatch'.
_ENQUEUE = """
if KEYS[4] ~= '' then
  local existing = redis.call('GET', KEYS[4])
  if existing then
    local id, fp = string.match(existing, '^(%S+) ?(%S*)$')
    if id == nil then id, fp = existing, '' end
    if fp ~= '' and ARGV[9] ~= '' and fp ~= ARGV[9] then return {'mismatch', id} end
    return {'dup', id}
  end
end
local depth = redis.call('XLEN', KEYS[1])
if depth >= tonumber(ARGV[5]) then return {'full', tostring(depth)} end
redis.call('HSET', KEYS[2], 'id', ARGV[1], 'model', ARGV[4], 'status', 'queued', 'request', ARGV[3],
           'created', ARGV[2], 'step', '0', 'steps', ARGV[7], 'attempts', '0')
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('XADD', KEYS[3], '*', 'e', ARGV[8])
redis.call('EXPIRE', KEYS[3], ARGV[6])
redis.call('XADD', KEYS[1], '*', 'job', ARGV[1])
if KEYS[4] ~= '' then redis.call('SET', KEYS[4], ARGV[1] .. ' ' .. ARGV[9], 'EX', ARGV[6]) end
return {'ok', ARGV[1]}
"""

# KEYS: job, events, done, stream
# ARGV: worker, now, max_attempts, ttl, entry_id
_START = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then
  redis.call('XACK', KEYS[4], 'workers', ARGV[5]); redis.call('XDEL', KEYS[4], ARGV[5])
  return {'gone'}
end
if st == 'succeeded' or st == 'failed' or st == 'cancelled' then
  redis.call('XACK', KEYS[4], 'workers', ARGV[5]); redis.call('XDEL', KEYS[4], ARGV[5])
  return {'done', st}
end
local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
local now = tonumber(ARGV[2])
if n > tonumber(ARGV[3]) then
  local reason = 'gave up after ' .. (n - 1) .. ' attempts: the workers running it stopped responding'
  redis.call('HSET', KEYS[1], 'status', 'failed', 'finished', ARGV[2], 'error', reason)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', 2000, '*', 'e',
             cjson.encode({type='failed', error=reason, t=now}))
  redis.call('RPUSH', KEYS[3], 'failed')
  for _, k in ipairs({KEYS[1], KEYS[2], KEYS[3]}) do redis.call('EXPIRE', k, ARGV[4]) end
  redis.call('XACK', KEYS[4], 'workers', ARGV[5]); redis.call('XDEL', KEYS[4], ARGV[5])
  return {'exhausted', reason}
end
redis.call('HSET', KEYS[1], 'status', 'running', 'started', ARGV[2], 'worker', ARGV[1], 'step', '0')
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 2000, '*', 'e',
           cjson.encode({type='started', worker=ARGV[1], attempt=n, t=now}))
local f = redis.call('HMGET', KEYS[1], 'request', 'created', 'cancel')
return {'ok', f[1], f[2], f[3] or '', tostring(n)}
"""

# KEYS: job, events, images, done, stream
# ARGV: status, now, result_json, error, ttl, entry_id, event_json, step ('' for none), n_progress,
#       progress_event_1 .. progress_event_n, img0, img1, ...
# The job's last progress events travel with its outcome: one round trip, and they still come
# before the final event.
_FINISH = """
local st = redis.call('HGET', KEYS[1], 'status')
redis.call('XACK', KEYS[5], 'workers', ARGV[6]); redis.call('XDEL', KEYS[5], ARGV[6])
if (not st) or st == 'succeeded' or st == 'failed' or st == 'cancelled' then return 0 end
local first_img = 10 + tonumber(ARGV[9])
for i = 10, first_img - 1 do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', 2000, '*', 'e', ARGV[i])
end
if ARGV[8] ~= '' then redis.call('HSET', KEYS[1], 'step', ARGV[8]) end
if #ARGV >= first_img then
  for i = first_img, #ARGV do redis.call('HSET', KEYS[3], tostring(i - first_img), ARGV[i]) end
  redis.call('EXPIRE', KEYS[3], ARGV[5])
end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished', ARGV[2], 'result', ARGV[3], 'error', ARGV[4])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 2000, '*', 'e', ARGV[7])
redis.call('RPUSH', KEYS[4], ARGV[1])
for _, k in ipairs({KEYS[1], KEYS[2], KEYS[4]}) do redis.call('EXPIRE', k, ARGV[5]) end
return 1
"""

# KEYS: job, events, done ; ARGV: now, ttl
_CANCEL = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished', ARGV[1], 'error', 'cancelled by the client')
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', 2000, '*', 'e',
             cjson.encode({type='cancelled', t=tonumber(ARGV[1])}))
  redis.call('RPUSH', KEYS[3], 'cancelled')
  for _, k in ipairs(KEYS) do redis.call('EXPIRE', k, ARGV[2]) end
  return 'cancelled'
end
if st == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  return 'cancelling'
end
return st
"""

# Put a delivered but never started job back at the end of its stream (graceful shutdown).
# KEYS: stream, job ; ARGV: entry_id, job_id
_RELEASE = """
redis.call('XACK', KEYS[1], 'workers', ARGV[1]); redis.call('XDEL', KEYS[1], ARGV[1])
local st = redis.call('HGET', KEYS[2], 'status')
if st == 'queued' then redis.call('XADD', KEYS[1], '*', 'job', ARGV[2]) return 1 end
return 0
"""


class QueueFull(Exception):
    def __init__(self, depth: int):
        super().__init__(f"queue full ({depth} jobs waiting)")
        self.depth = depth


class IdempotencyMismatch(Exception):
    """The idempotency key was already used for a different request."""

    def __init__(self, job_id: str):
        super().__init__(f"the idempotency key belongs to job {job_id}, made from another request")
        self.job_id = job_id


def decode_job(raw: dict) -> dict[str, Any] | None:
    """A job hash as a plain dict with parsed JSON fields."""
    if not raw:
        return None
    job = {_s(k): _s(v) for k, v in raw.items()}
    for key in ("request", "result"):
        if job.get(key):
            try:
                job[key] = json.loads(job[key])
            except ValueError:
                job[key] = None  # not written by this service; shown as absent rather than failing the read
            if not isinstance(job[key], dict):
                job[key] = None
    for key in ("created", "started", "finished"):
        if job.get(key):
            job[key] = float(job[key])
    for key in ("step", "steps", "attempts"):
        job[key] = int(job.get(key) or 0)
    return job


def _ordered_images(raw: dict) -> list[bytes]:
    """Image bytes by index; fields that are not indexes were not written here and are ignored."""
    indexed = {int(_s(k)): v for k, v in raw.items() if _s(k).isdigit()}
    return [indexed[i] for i in sorted(indexed)]


def event_json(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, "t": time.time(), **fields}, separators=(",", ":"))


# ---------------------------------------------------------------------------- producer side
class JobQueue:
    """What the API does with the queue (``redis.asyncio`` client)."""

    def __init__(self, redis: Any, *, max_queue: int, ttl_s: int):
        self.r = redis
        self.max_queue = max_queue
        self.ttl_s = ttl_s
        self._enqueue = redis.register_script(_ENQUEUE)
        self._cancel = redis.register_script(_CANCEL)

    async def enqueue(self, model: str, request: dict[str, Any], steps: int,
                      idempotency: str | None = None, fingerprint: str = "") -> tuple[str, bool]:
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
            args=[job_id, repr(time.time()), json.dumps(request, separators=(",", ":")), model,
                  self.max_queue, self.ttl_s, steps, event_json("queued", model=model), fingerprint])
        tag, value = _s(res[0]), _s(res[1])
        if tag == "full":
            raise QueueFull(int(value))
        if tag == "mismatch":
            raise IdempotencyMismatch(value)
        return value, tag == "ok"

    async def get(self, job_id: str) -> dict[str, Any] | None:
        return decode_job(await self.r.hgetall(job_key(job_id)))

    async def image(self, job_id: str, index: int) -> bytes | None:
        return await self.r.hget(images_key(job_id), str(index))

    async def images(self, job_id: str) -> list[bytes]:
        raw = await self.r.hgetall(images_key(job_id))
        return _ordered_images(raw)

    async def cancel(self, job_id: str) -> str:
        res = await self._cancel(keys=[job_key(job_id), events_key(job_id), done_key(job_id)],
                                 args=[repr(time.time()), self.ttl_s])
        return _s(res)

    async def wait_result(self, job_id: str, timeout_s: float) -> tuple[bool, dict[str, Any] | None, list[bytes]]:
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
        return True, decode_job(raw_job), images

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
                if event.get("type") in ("finished", "failed", "cancelled"):
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


# ---------------------------------------------------------------------------- consumer side
@dataclass
class Delivery:
    """One stream entry handed to this worker."""

    model: str
    entry_id: str
    job_id: str


@dataclass
class StartedJob:
    delivery: Delivery
    request: dict[str, Any]
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
        self._start = redis.register_script(_START)
        self._finish = redis.register_script(_FINISH)
        self._release = redis.register_script(_RELEASE)
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

    def peek_requests(self, deliveries: list[Delivery]) -> list[dict[str, Any] | None]:
        pipe = self.r.pipeline(transaction=False)
        for d in deliveries:
            pipe.hget(job_key(d.job_id), "request")
        return [parse_request(v) if v else None for v in pipe.execute()]

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
                req = parse_request(res[1])
                try:
                    created = float(_s(res[2]))
                except (TypeError, ValueError):
                    created, req = now, None
                job = StartedJob(d, req or {}, created, now, int(_s(res[4])), _s(res[3]) == "1")
                if req is None:
                    self.finish(job, "failed", {}, "the stored request is not a valid job; it was not run")
                    skipped.append((d, "invalid request"))
                else:
                    started.append(job)
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

    def finish(self, job: StartedJob, status: str, result: dict[str, Any], error: str = "",
               images: list[bytes] = (), progress: list[str] = (), step: int | None = None) -> bool:
        """Store the outcome and acknowledge, atomically; False if another worker finished it first.

        ``progress`` (event JSON strings) go into the job's event stream before its final
        event, and ``step`` into its ``step`` field, in the same round trip; a job that was
        already finished gets neither.
        """
        d = job.delivery
        kind = "finished" if status == "succeeded" else status
        ev = event_json(kind, status=status, error=error or None, images=len(images))
        res = self._finish(keys=[job_key(d.job_id), events_key(d.job_id), images_key(d.job_id),
                                 done_key(d.job_id), stream_key(d.model)],
                           args=[status, repr(time.time()), json.dumps(result, separators=(",", ":")),
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
