"""Which jobs of the running call are still wanted: cancels and deadlines, within a block.

A job leaves its call when its client cancels it or its deadline passes. It is then
finished at once (its record says ``cancelled``, or ``failed`` with the deadline named),
while its batch mates run on; its share of the call's images is dropped. When no job of
the call is wanted any more, the call's stop event is set, and the runner stops it
between two transformer blocks (:mod:`service.worker.runners.interrupt`).

Cancel flags come back with the progress round trips (:mod:`.progress`); a call whose
steps are long (or that has made no round trip yet) is polled by :class:`CallWatcher`'s
thread, so a cancel lands within about :data:`POLL_S` plus one block however long a
step takes.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from service.broker.consumer import StartedJob, WorkerQueue
from service.contract import CANCELLED, DEADLINE_EXCEEDED, FAILED

log = logging.getLogger("clusca.worker")

# How often the watcher reads the cancel flags and clocks of a running call.
POLL_S = 0.2
CANCELLED_BY_CLIENT = "cancelled by the client"

# Finishes one job that left its call: (job, status, error text).
EndJob = Callable[[StartedJob, str, str], None]


def deadline_error(job: StartedJob) -> str:
    return (f"{DEADLINE_EXCEEDED}: the job did not finish within its timeout_s of {job.request.timeout_s:g} s "
            f"from submission")


class CallWatch:
    """The fate of each job of one runner call, shared by the call, the progress pump and the watcher.

    :meth:`end` records a job leaving the call and finishes it through ``end_job`` (once);
    :meth:`close` ends the watch when the call returns and says which jobs left it, so the
    call's outcome is stored only for the others.
    """

    def __init__(self, jobs: list[StartedJob], end_job: EndJob):
        self.jobs = jobs
        self.stop = threading.Event()
        self.began = time.monotonic()
        self._end_job = end_job
        self._ended: dict[str, str] = {}  # job id -> status it was finished with
        self._closed = False
        self._lock = threading.Lock()

    def live(self) -> list[StartedJob]:
        with self._lock:
            return [j for j in self.jobs if j.delivery.job_id not in self._ended]

    def end(self, job: StartedJob, status: str, error: str) -> None:
        """``job`` leaves the call with ``status``; the call stops once no job is left in it."""
        with self._lock:
            if self._closed or job.delivery.job_id in self._ended:
                return
            self._ended[job.delivery.job_id] = status
            if len(self._ended) == len(self.jobs):
                self.stop.set()
            try:
                self._end_job(job, status, error)
            except Exception:  # noqa: BLE001 - the watcher must outlive a failed store; the job is retried
                log.exception("job %s: could not store its %s outcome", job.delivery.job_id, status)

    def cancel(self, job_id: str) -> None:
        for j in self.jobs:
            if j.delivery.job_id == job_id:
                self.end(j, CANCELLED, CANCELLED_BY_CLIENT)

    def expire(self, now: float | None = None) -> None:
        """End every job whose deadline (its creation plus ``timeout_s``) has passed."""
        now = time.time() if now is None else now
        for j in self.jobs:
            if j.request.timeout_s is not None and now >= j.created + j.request.timeout_s:
                self.end(j, FAILED, deadline_error(j))

    def all_ended(self) -> bool:
        return self.stop.is_set()

    def close(self) -> set[str]:
        """No job leaves the call after this; returns the ids of those that did."""
        with self._lock:
            self._closed = True
            return set(self._ended)


class CallWatcher(threading.Thread):
    """Polls the cancel flags and deadlines of the calls this worker runs, off the call's thread.

    A call younger than ``poll_s`` costs no round trip: short jobs get their flags back
    with their progress (or not at all), as before.
    """

    def __init__(self, q: WorkerQueue, poll_s: float = POLL_S, stopping: threading.Event | None = None):
        super().__init__(name="call-watcher", daemon=True)
        self.q = q
        self.poll_s = poll_s
        # The worker's stop: once set, every running call is stopped too (the worker hands its jobs back).
        self.stopping = stopping
        self._calls: list[CallWatch] = []
        self._cond = threading.Condition()

    def watch(self, call: CallWatch) -> None:
        with self._cond:
            self._calls.append(call)
            self._cond.notify()

    def unwatch(self, call: CallWatch) -> None:
        with self._cond:
            if call in self._calls:
                self._calls.remove(call)

    def run(self) -> None:
        while True:
            with self._cond:
                while not self._calls:
                    self._cond.wait()
                calls = list(self._calls)
            time.sleep(self.poll_s)
            for call in calls:
                if self.stopping is not None and self.stopping.is_set():
                    call.stop.set()
                elif time.monotonic() - call.began >= self.poll_s:
                    self.check(call)

    def check(self, call: CallWatch) -> None:
        call.expire()
        live = call.live()
        if not live:
            return
        try:
            cancelled = self.q.cancel_flags([j.delivery.job_id for j in live])
        except Exception:  # noqa: BLE001 - Redis down: the call runs on; its outcome waits for Redis anyway
            return
        for job_id in cancelled:
            call.cancel(job_id)
