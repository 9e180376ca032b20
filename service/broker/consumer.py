"""The consumer side of the Redis Streams queue: what a worker does (synchronous client).

Read new entries (per cluster slot where the streams span several; a model's short lane
before its long lane, :mod:`service.broker.lanes`), reclaim entries a dead worker left
pending, start jobs with attempt counting, publish progress, and finish each job exactly
once with its acknowledgement: start and finish are single Lua scripts
(:mod:`service.broker.lua`), so two workers that both ran a job after a takeover cannot
both store a result.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

from service.contract import EVENTS_MAXLEN, FINAL_EVENT, GROUP, JobRequest, JobResult, as_text
from service.broker.keys import (check_layout, done_key, events_key, images_key, input_key, job_key, job_tag, stream_key, stream_keys, worker_key, workers_key)
from service.broker.lanes import LANES, LONG, SHORT
from service.broker.connect import is_cluster
from service.broker.slot_route import SlotRoute, run_scripts
from service.broker.lua import SCRIPTS
from service.broker.wire import ALIVE_WINDOW_S, entry_job_id, event_json

T = TypeVar("T")

log = logging.getLogger("clusca.queue")

# How often a worker whose streams span several cluster slots polls them (one blocking read
# cannot wait on keys of different slots).
SPREAD_POLL_S = 0.005


@dataclass
class Delivery:
    """One stream entry handed to this worker, from the stream of ``model``'s ``lane``.

    Everything done with the entry (start, finish, release, touch) goes to :attr:`stream`,
    the stream it came from."""

    model: str
    entry_id: str
    job_id: str
    lane: str = SHORT

    @property
    def stream(self) -> str:
        return stream_key(self.model, self.lane)


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
                 visibility_timeout_s: float, max_attempts: int, lanes: tuple[str, ...] = LANES):
        self.r = redis
        self.worker_id = worker_id
        self.models = list(models)
        unknown = [x for x in lanes if x not in LANES]
        if unknown or SHORT not in lanes:
            raise ValueError(f"lanes must include {SHORT!r} and be among {list(LANES)}, got {list(lanes)}")
        self.lanes = tuple(x for x in LANES if x in lanes)  # short first, whatever order was given
        self.ttl_s = ttl_s
        self.visibility_ms = int(visibility_timeout_s * 1000)
        self.max_attempts = max_attempts
        self._start = redis.register_script(SCRIPTS["start"])
        self._finish = redis.register_script(SCRIPTS["finish"])
        self._release = redis.register_script(SCRIPTS["release"])
        self._requeue = redis.register_script(SCRIPTS["requeue"])
        # Where the next reclaim scan of each stream's pending list starts (see reclaim()).
        self._reclaim_from: dict[str, str] = {}
        # Stream key -> (model, lane), for every stream this worker reads, short lanes first.
        self._source = {stream_key(m, lane): (m, lane) for lane in self.lanes for m in self.models}
        self._cluster = is_cluster(redis)
        self._short_groups = _by_slot([stream_key(m, SHORT) for m in self.models], self._cluster)
        self._long_groups = (_by_slot([stream_key(m, LONG) for m in self.models], self._cluster)
                             if LONG in self.lanes else [])
        self._all_groups = _by_slot(list(self._source), self._cluster)
        self._route = SlotRoute(redis)

    def ensure_groups(self) -> None:
        """Check the key layout (:func:`~service.broker.keys.check_layout`), then create missing consumer groups."""
        check_layout(self.r, self.models)
        # Every lane's group, read here or not: a model's streams are there for every worker.
        for key in [k for m in self.models for k in stream_keys(m)]:
            try:
                self.r.xgroup_create(key, GROUP, id="0", mkstream=True)
            except Exception as exc:  # noqa: BLE001
                if "BUSYGROUP" not in str(exc):
                    raise

    def read(self, count: int, block_ms: int, short_only: bool = False) -> list[Delivery]:
        """New entries for this worker's models: short-lane ones (at most ``count``) when any wait,
        else one long-lane entry per model at most, waiting up to ``block_ms`` for either.
        ``short_only`` reads no long lane (without blocking: a batch waiting for short mates).

        Long jobs come one at a time: each is a call's worth of work by itself, and reading
        several would hold them here, behind each other, while other workers could run them.
        """
        out = self._poll(self._short_groups, count)
        if short_only:
            return out
        if not out and self._long_groups:
            out = self._poll(self._long_groups, 1)
        if out or block_ms <= 0:
            return out
        if len(self._all_groups) == 1:
            # One slot: one blocking read wakes on either lane (COUNT 1 per stream: no batch of long jobs).
            out = self._deliveries(self._read(self._all_groups[0], 1, block_ms))
            shorts = sum(d.lane == SHORT for d in out)
            if shorts and count > shorts:
                out += self._poll(self._short_groups, count - shorts)
            return sorted(out, key=lambda d: LANES.index(d.lane))
        # Streams in several cluster slots: poll them until one has work.
        deadline = time.monotonic() + block_ms / 1000
        while not out and time.monotonic() < deadline:
            time.sleep(SPREAD_POLL_S)
            out = self._poll(self._short_groups, count)
            if not out and self._long_groups:
                out = self._poll(self._long_groups, 1)
        return out

    def _poll(self, groups: list[dict[str, str]], count: int) -> list[Delivery]:
        """Entries waiting in ``groups``' streams, without blocking, up to ``count`` per stream and
        read until ``count`` in all (each read entry is this worker's now: none is dropped)."""
        out: list[Delivery] = []
        for streams in groups:
            out += self._deliveries(self._read(streams, count - len(out), None))
            if len(out) >= count:
                break
        return out

    def _read(self, streams: dict[str, str], count: int, block_ms: int | None) -> Any:
        # Straight to the slot's primary: the cluster client would ask the server for XREADGROUP's keys first.
        return self._route.call(next(iter(streams)), lambda c: c.xreadgroup(GROUP, self.worker_id, streams,
                                                                            count=count, block=block_ms))

    def _deliveries(self, res: Any) -> list[Delivery]:
        out = []
        for stream, entries in res or []:
            model, lane = self._source[as_text(stream)]
            for entry_id, fields in entries:
                delivery = self._delivery(model, lane, entry_id, fields) if fields else None
                if delivery is not None:
                    out.append(delivery)
        return out

    def _delivery(self, model: str, lane: str, entry_id: Any, fields: Any) -> Delivery | None:
        """The delivery a stream entry of ``model``'s ``lane`` stands for; None for one that names no job
        (discarded)."""
        job_id = entry_job_id(fields, model)
        if job_id is None:
            self.discard(Delivery(model, as_text(entry_id), "", lane))
            return None
        return Delivery(model, as_text(entry_id), job_id, lane)

    def discard(self, d: Delivery) -> None:
        """Drop a stream entry the API did not write (it names no job): acknowledged and deleted, never run."""
        log.warning("discarding malformed entry %s in the %s stream", d.entry_id, d.stream)
        self.r.xack(d.stream, GROUP, d.entry_id)
        self.r.xdel(d.stream, d.entry_id)

    def reclaim(self, count: int) -> list[Delivery]:
        """Entries another worker held longer than the visibility timeout without finishing.

        XAUTOCLAIM looks at a bounded window of the pending list per call, so each call goes on
        from where the previous one stopped: a dead worker's entries are found however many
        live entries precede them.
        """
        out: list[Delivery] = []
        for key, (m, lane) in self._source.items():
            if len(out) >= count:
                break
            res = self.r.xautoclaim(key, GROUP, self.worker_id, self.visibility_ms,
                                    start_id=self._reclaim_from.get(key, "0-0"), count=count - len(out))
            self._reclaim_from[key] = as_text(res[0]) if res else "0-0"
            for item in res[1] if res else []:
                if not item:
                    continue
                entry_id, fields = item
                if not fields:  # deleted entry still in the pending list
                    self.r.xack(key, GROUP, entry_id)
                    continue
                delivery = self._delivery(m, lane, entry_id, fields)
                if delivery is not None:
                    out.append(delivery)
        return out

    def touch(self, deliveries: list[Delivery]) -> None:
        """Reset the idle time of entries this worker still works on (it is alive, not stuck)."""
        by_stream: dict[str, list[str]] = {}
        for d in deliveries:
            by_stream.setdefault(d.stream, []).append(d.entry_id)
        for key, ids in by_stream.items():
            self.r.xclaim(key, GROUP, self.worker_id, 0, ids, justid=True)

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

    def start(self, deliveries: list[Delivery], known: Mapping[str, JobRequest] | None = None,
              ) -> tuple[list[StartedJob], list[tuple[Delivery, str]]]:
        """Mark jobs running (counting attempts). Returns started jobs and skipped ones with why.

        ``known``: requests already read (:meth:`peek_requests`) by job id (entry ids are unique
        within one stream only); a stored request never changes, so these are not parsed a second time."""
        now = time.time()
        calls = [dict(keys=[job_key(d.job_id), events_key(d.job_id), done_key(d.job_id), d.stream],
                      args=[self.worker_id, repr(now), self.max_attempts, self.ttl_s, d.entry_id]) for d in deliveries]
        replies = run_scripts(self.r, self._cluster, self._start, calls)
        started, skipped = [], []
        for d, res in zip(deliveries, replies):
            tag = as_text(res[0])
            if tag == "ok":
                req = (known or {}).get(d.job_id) or JobRequest.parse(res[1])
                try:
                    created = float(as_text(res[2]))
                except (TypeError, ValueError):
                    created, req = now, None
                if req is None:
                    # Only the delivery matters to finish(); the request stands in for the unreadable one.
                    job = StartedJob(d, JobRequest("", 1, 1, 1, 0.0, 0), created, now, int(as_text(res[4])), False)
                    self.finish(job, "failed", JobResult(), "the stored request is not a valid job; it was not run")
                    skipped.append((d, "invalid request"))
                else:
                    started.append(StartedJob(d, req, created, now, int(as_text(res[4])), as_text(res[3]) == "1"))
            else:
                skipped.append((d, tag if len(res) < 2 else f"{tag}: {as_text(res[1])}"))
        return started, skipped

    def progress(self, items: list[tuple[list[StartedJob], int, int]]) -> set[str]:
        """Store ``(jobs, step, steps)`` items in one round trip; return the ids of those jobs whose
        client asked to cancel them.

        One progress event per job and step, in order; each job's ``step`` field and cancel
        flag are written and read once, for its latest step.
        """
        latest: dict[str, int] = {}
        for jobs, step, _ in items:
            for j in jobs:
                latest[j.delivery.job_id] = step
        if not latest:
            return set()

        def run(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for jobs, step, steps in items:
                ev = event_json("progress", step=step, steps=steps)
                for j in jobs:
                    pipe.xadd(events_key(j.delivery.job_id), {"e": ev}, maxlen=EVENTS_MAXLEN, approximate=True)
            for job_id, step in latest.items():
                pipe.hset(job_key(job_id), "step", step)
                pipe.hget(job_key(job_id), "cancel")
            return pipe.execute()

        res = self._one_slot(list(latest), run)
        flags = res[len(res) - 2 * len(latest) + 1::2]  # the HGET replies, after every XADD
        return {job_id for job_id, flag in zip(latest, flags) if as_text(flag) == "1"}

    def cancel_flags(self, job_ids: list[str]) -> set[str]:
        """Which of these running jobs their clients asked to cancel (one round trip)."""
        def run(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hget(job_key(job_id), "cancel")
            return pipe.execute()

        return {j for j, flag in zip(job_ids, self._one_slot(job_ids, run) if job_ids else []) if as_text(flag) == "1"}

    def finish(self, job: StartedJob, status: str, result: JobResult, error: str = "",
               images: list[bytes] = (), progress: list[str] = (), step: int | None = None) -> bool:
        """Store the outcome and acknowledge, atomically; False if another worker finished it first.

        ``progress`` (event JSON strings) go into the job's event stream before its final
        event, and ``step`` into its ``step`` field, in the same round trip; a job that was
        already finished gets neither.
        """
        d = job.delivery
        ev = event_json(FINAL_EVENT[status], status=status, error=error or None, images=len(images))
        keys = [job_key(d.job_id), events_key(d.job_id), images_key(d.job_id), done_key(d.job_id), d.stream]
        args = [status, repr(time.time()), result.to_json(), error, self.ttl_s, d.entry_id, ev,
                "" if step is None else int(step), len(progress), *progress, *images]
        return bool(self._route.call(keys[0], lambda c: self._finish(keys=keys, args=args, client=c)))

    def release(self, deliveries: list[Delivery]) -> None:
        """Hand unstarted jobs back to the queue (each goes to the end of the stream it came from)."""
        for d in deliveries:
            self._release(keys=[d.stream, job_key(d.job_id)], args=[d.entry_id, d.job_id])

    def requeue(self, jobs: list[StartedJob]) -> int:
        """Hand started jobs back unrun (the worker is stopping): queued again at the end of their
        stream, their attempt given back; a job whose client asked to cancel it is cancelled.
        Returns how many went back to the queue."""
        back = 0
        for j in jobs:
            d = j.delivery
            keys = [d.stream, job_key(d.job_id), events_key(d.job_id), done_key(d.job_id)]
            args = [d.entry_id, d.job_id, self.worker_id, repr(time.time()), self.ttl_s]
            back += int(self._requeue(keys=keys, args=args)) == 1
        return back

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


def stored_input(q: WorkerQueue, model: str, digest: str) -> bytes | None:
    """An edit's input as the API stored it in Redis (None once it expired)."""
    return q.r.get(input_key(model, digest))


def _by_slot(keys: list[str], cluster: bool) -> list[dict[str, str]]:
    """XREADGROUP arguments: one read for all streams, or on a cluster one per slot."""
    if not cluster:
        return [{k: ">" for k in keys}]
    from redis.crc import key_slot

    groups: dict[int, dict[str, str]] = {}
    for k in keys:
        groups.setdefault(key_slot(k.encode()), {})[k] = ">"
    return list(groups.values())
