"""Step progress from the denoising loop to Redis, off the loop's thread.

The step callback only appends to a list; a background thread turns the steps into
progress events in as few round trips as it can, and reads the jobs' cancel flags on
the way back (handing them to the call's :class:`~service.worker.watch.CallWatch`). The worker takes whatever is still waiting when a batch ends and stores it
with the results (:func:`progress_by_job`).
"""

from __future__ import annotations

import threading
import time

from service.broker.consumer import StartedJob, WorkerQueue
from service.broker.wire import event_json
from service.worker.watch import CallWatch

# Least time between two progress round trips of a worker (see ProgressPump). A job of up
# to this length makes no progress round trip of its own: its steps go out with its result.
PROGRESS_INTERVAL_S = 0.25

# One published step: (the call's jobs still in it, steps done, steps in all, the call's watch).
ProgressItem = tuple[list[StartedJob], int, int, CallWatch]


class ProgressPump:
    """Publishes step progress from a background thread, so the denoising loop never waits on Redis.

    Every step still becomes its own progress event, in order, but steps travel in as few
    round trips as possible: a step waits at most ``interval_s``, and all the steps waiting
    go out together in one pipeline (at the latest when the batch ends: :meth:`flush`, or
    :meth:`take` and the worker stores them with the results). A round trip per step cost
    far more than the step's own bookkeeping where steps are short (thread wake-ups and the
    Redis server competing for the cores that run the model); a job shorter than the
    interval costs no round trip during its run at all.

    Each round trip also reads the jobs' cancel flags and hands those set to the call's
    watch, which ends the jobs at once (a call with long steps is also polled by the
    watcher, so a cancel never waits for a step to end).
    """

    def __init__(self, q: WorkerQueue, interval_s: float = PROGRESS_INTERVAL_S):
        self.q = q
        self.interval_s = interval_s
        self._cond = threading.Condition()
        self._pending: list[ProgressItem] = []
        self._first_at = 0.0  # when the oldest waiting step was published
        self._idle = False  # the thread sleeps until the next step: only then does publish wake it
        self._sending = False  # a round trip is under way (from the thread or from flush)
        self._skip_until = float("-inf")
        threading.Thread(target=self._run, name="progress", daemon=True).start()

    def publish(self, jobs: list[StartedJob], step: int, steps: int, watch: CallWatch) -> None:
        with self._cond:
            if not self._pending:
                self._first_at = time.monotonic()
            self._pending.append((jobs, step, steps, watch))
            if self._idle:
                self._cond.notify()

    def flush(self, timeout_s: float = 10.0) -> None:
        """Send every published step now, from the calling thread, after any round trip under way.

        Sending here rather than waking the thread and waiting for it saves two thread
        switches on the way to the job's result.
        """
        with self._cond:
            if not self._wait_no_round_trip(timeout_s):
                return
            items, self._pending = self._pending, []
            self._sending = True
        self._send_owned(items)

    def take(self, timeout_s: float = 10.0) -> list[ProgressItem]:
        """Hand every published step not yet sent to the caller, after any round trip under way.

        The caller stores them itself (the worker: with the job's result, one round trip
        fewer), so each step is still sent exactly once and after the steps before it.
        After ``timeout_s`` with a round trip still under way, returns nothing; the steps
        then go out with the thread's next round trip.
        """
        with self._cond:
            if not self._wait_no_round_trip(timeout_s):
                return []
            items, self._pending = self._pending, []
        return items

    def _wait_no_round_trip(self, timeout_s: float) -> bool:
        """With the lock held: wait until no round trip is under way; False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self._sending:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._cond.wait(left)
        return True

    def _send_owned(self, items: list[ProgressItem]) -> None:
        """Send ``items`` for the caller that set ``_sending``, then release the round trip."""
        try:
            self._send(items)
        finally:
            with self._cond:
                self._sending = False
                self._cond.notify_all()

    def _send(self, items: list[ProgressItem]) -> None:
        if not items or time.monotonic() < self._skip_until:
            return
        try:
            cancelled = self.q.progress([(jobs, step, steps) for jobs, step, steps, _ in items])
        except Exception:  # noqa: BLE001 - progress is best effort; the result is what must not be lost
            self._skip_until = time.monotonic() + 2.0  # Redis just failed: drop progress, do not fall behind
            return
        watches = {id(w): w for *_, w in items}.values()  # a call's steps share its watch
        for job_id in cancelled:
            for watch in watches:
                watch.cancel(job_id)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending or self._sending:
                    self._idle = not self._sending
                    self._cond.wait()
                self._idle = False
                # Let steps gather until the oldest has waited the interval; publish does not
                # wake the thread meanwhile, a flush may take them first.
                while self._pending:
                    left = self._first_at + self.interval_s - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._sending or not self._pending:
                    continue
                items, self._pending = self._pending, []
                self._sending = True
            self._send_owned(items)


def progress_by_job(items: list[ProgressItem]) -> dict[str, tuple[list[str], int]]:
    """Progress items as ``{job_id: (event JSON strings in order, latest step)}``."""
    out: dict[str, tuple[list[str], int]] = {}
    for jobs, step, steps, _ in items:
        ev = event_json("progress", step=step, steps=steps)
        for j in jobs:
            events, _ = out.get(j.delivery.job_id, ([], 0))
            events.append(ev)
            out[j.delivery.job_id] = (events, step)
    return out
