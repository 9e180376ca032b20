"""The worker's liveness: which deliveries it holds, and the thread that says so.

Every interval the heartbeat thread writes the worker's description (models, jobs
running, jobs done) and refreshes the idle time of every delivery it holds, so that no
other worker reclaims a job this one is still running. Deliveries are held from the
moment they are read until they are finished or handed back.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any, Callable

from service import metrics
from service.broker.consumer import Delivery, WorkerQueue
from service.broker.wire import HEARTBEAT_S

log = logging.getLogger("clusca.worker")


class HeldDeliveries:
    """The deliveries this worker is working on, shared by its loop and its heartbeat thread."""

    def __init__(self) -> None:
        # By stream and entry id: entry ids are unique within a stream only (two lanes, or two
        # models, may each give an entry the same id).
        self._held: dict[tuple[str, str], Delivery] = {}
        self._lock = threading.Lock()

    def hold(self, ds: list[Delivery]) -> None:
        with self._lock:
            for d in ds:
                self._held[(d.stream, d.entry_id)] = d

    def release(self, ds: list[Delivery]) -> None:
        with self._lock:
            for d in ds:
                self._held.pop((d.stream, d.entry_id), None)

    def snapshot(self) -> list[Delivery]:
        with self._lock:
            return list(self._held.values())


class Heartbeat(threading.Thread):
    """Writes the worker's heartbeat and touches its held deliveries until ``stop`` is set."""

    def __init__(self, q: WorkerQueue, held: HeldDeliveries, stop: threading.Event, *, worker_id: str,
                 models: dict[str, dict[str, Any]] | Callable[[], dict[str, dict[str, Any]]],
                 jobs_done: Callable[[], int], visibility_timeout_s: float):
        super().__init__(name="heartbeat", daemon=True)
        self.q, self.held, self.stop = q, held, stop
        self.jobs_done = jobs_done
        self.worker_id = worker_id
        # What each model says of itself, read at every beat (its loaded adapters change), or fixed.
        self.models = models if callable(models) else (lambda: models)
        self.info = {"id": worker_id, "pid": os.getpid(), "host": socket.gethostname()}
        # Three beats per visibility timeout at least: one lost beat must not cost a job.
        self.interval = min(HEARTBEAT_S, visibility_timeout_s / 3)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                held = self.held.snapshot()
                self.q.heartbeat({**self.info, "models": self.models(), "running": len(held),
                                  "jobs_done": self.jobs_done()})
                if held:
                    self.q.touch(held)
                metrics.HEARTBEAT.labels(self.worker_id).set(time.time())
            except Exception as exc:  # noqa: BLE001 - the heartbeat must outlive Redis hiccups
                log.debug("heartbeat failed: %s", exc)
            self.stop.wait(self.interval)
