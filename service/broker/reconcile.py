"""Finding jobs a failover lost: the API remembers what it confirmed and checks it later.

With asynchronous replication a primary confirms a write before any replica has it; if
it dies in that gap, the replica promoted in its place never saw the job. Nothing in
Redis can say so afterwards, so the API keeps a short journal of the jobs it confirmed
and, once each is ``settle_s`` old, asks the (by then possibly new) primary whether it
still holds the job. A job that is gone was lost: it is logged at ERROR with its id and
model, counted in ``clusca_jobs_lost_total{model}``, and listed by
``GET /admin/lost-jobs``. A check that cannot reach Redis is retried; the journal only
forgets a job once Redis has answered for it.

Jobs are never deleted before their result TTL (hours), so within the journal's window
"gone" means "lost", never "expired". With ``CLUSCA_REDIS_WAIT_REPLICAS`` the API
confirms a job only once a replica holds it, and this journal should stay empty.

With an :class:`~service.broker.ack_log.AckLog` (``CLUSCA_RECONCILE_JOURNAL``) the journal is also
on disk: a process that starts checks what a stopped one left unchecked. Entries older
than the result TTL are dropped then, unchecked: their jobs may have expired.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from service import metrics
from service.broker.ack_log import AckLog
from service.broker.keys import job_key
from service.broker.connect import UNAVAILABLE, is_transport_failure

log = logging.getLogger("clusca.reconcile")


@dataclass(frozen=True)
class LostJob:
    id: str
    model: str
    acknowledged_at: float


class AckJournal:
    """Confirmed jobs waiting for their check, and the lost ones found so far (bounded)."""

    def __init__(self, settle_s: float = 5.0, capacity: int = 500_000, keep_lost: int = 10_000,
                 disk: AckLog | None = None, max_age_s: float = 86400.0):
        self.settle_s = settle_s
        self.capacity = capacity
        # (monotonic time, unix time, job id, model, segment of `disk` holding it, or -1)
        self._pending: deque[tuple[float, float, str, str, int]] = deque()
        self.lost: deque[LostJob] = deque(maxlen=keep_lost)
        self.checked = 0
        self.dropped = 0
        self.disk = disk
        self.max_age_s = max_age_s
        self.adopted = 0
        self.adopt_orphans()

    def adopt_orphans(self) -> int:
        """Take over the journals on disk that no live process holds (their process stopped or
        died, at our start or since: a rolling restart stops the old process after the new one
        started); return how many jobs they left unchecked."""
        if not self.disk:
            return 0
        now_wall, now_mono = time.time(), time.monotonic()
        entries = self.disk.adopt(since=now_wall - self.max_age_s)
        # Due as their age says; behind younger entries they wait at most one settle time more.
        for wall, job_id, model, seg in entries:
            self._pending.append((now_mono - (now_wall - wall), wall, job_id, model, seg))
        self.adopted += len(entries)
        return len(entries)

    def add(self, job_id: str, model: str) -> None:
        if len(self._pending) >= self.capacity:
            # Checks have been failing for a long time; the oldest entries can no longer be checked.
            self._forget([self._pending.popleft()])
            self.dropped += 1
        wall, seg = time.time(), -1
        if self.disk:
            try:
                seg = self.disk.append(wall, job_id, model)
            except OSError as exc:  # the job is confirmed already: it is still checked, from memory
                log.warning("could not write job %s to the journal on disk (%s)", job_id, exc)
        self._pending.append((time.monotonic(), wall, job_id, model, seg))

    def _forget(self, entries: list[tuple[float, float, str, str, int]]) -> None:
        if self.disk:
            for entry in entries:
                if entry[4] >= 0:
                    self.disk.checked(entry[4])

    @property
    def pending(self) -> int:
        return len(self._pending)

    def sync(self) -> None:
        """Make what the journal wrote durable on disk (one fsync at most)."""
        if self.disk:
            self.disk.sync()

    def close(self) -> None:
        if self.disk:
            self.disk.close()

    def _due(self, limit: int) -> list[tuple[float, float, str, str, int]]:
        cutoff, out = time.monotonic() - self.settle_s, []
        while self._pending and self._pending[0][0] <= cutoff and len(out) < limit:
            out.append(self._pending.popleft())
        return out

    async def check(self, r: Any, limit: int = 20_000) -> list[LostJob]:
        """Check the jobs that are due; return those Redis no longer holds."""
        due = self._due(limit)
        if not due:
            return []
        try:
            pipe = r.pipeline(transaction=False)
            for _, _, job_id, _, _ in due:
                pipe.exists(job_key(job_id))
            found = await pipe.execute()
        except Exception as exc:
            if isinstance(exc, UNAVAILABLE) or is_transport_failure(exc):  # checked again on the next round
                self._pending.extendleft(reversed(due))
            raise
        self._forget(due)
        lost = [LostJob(job_id, model, wall) for (_, wall, job_id, model, _), n in zip(due, found) if not n]
        for job in lost:
            log.error("job %s (model %s), confirmed to its client at %.3f, is missing from Redis: lost in a "
                      "failover before a replica had it", job.id, job.model, job.acknowledged_at)
            metrics.JOBS_LOST.labels(job.model).inc()
        self.lost.extend(lost)
        self.checked += len(due)
        return lost


async def run(journal: AckJournal, r: Any, interval_s: float = 1.0, adopt_every_s: float = 30.0) -> None:
    """Check the journal every ``interval_s`` and look for orphaned journals on disk every
    ``adopt_every_s``, until cancelled."""
    next_adoption = time.monotonic() + adopt_every_s
    while True:
        try:
            await journal.check(r)
        except UNAVAILABLE:
            pass
        except Exception as exc:  # noqa: BLE001 - the checker must outlive a bad reply
            if not is_transport_failure(exc):
                log.exception("reconciliation check failed")
        if time.monotonic() >= next_adoption:
            next_adoption = time.monotonic() + adopt_every_s
            try:
                journal.adopt_orphans()
            except OSError:
                log.exception("could not take over the journals of stopped API processes")
        try:
            journal.sync()
        except OSError:
            log.exception("could not sync the journal to disk")
        await asyncio.sleep(interval_s)
