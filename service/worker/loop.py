"""The worker process: warm models, batched runs, progress, results.

A worker loads each of its models once (a :class:`~service.worker.runners.Runner` per model),
then loops: read new jobs (and jobs a dead worker left behind; a model's short lane before
its long lane, :mod:`service.broker.lanes`, and only the short one with
``CLUSCA_WORKER_LANES=short``), group the compatible
ones (equal :meth:`~service.contract.JobRequest.batch_key`), run each group as ONE
runner call with one seed per image (so an image depends only on its own seed, not on
its batch mates), publish per-step progress (:mod:`service.worker.progress`), and store the
results (:mod:`service.worker.results`). The worker knows no model kind: loading, calling
conventions and statistics are the runners'.

SIGTERM (or SIGINT) stops the worker within about a transformer block: the running call
is stopped (:class:`~service.worker.watch.CallWatcher` sets its stop), and its jobs, with
those read but not started, go back to the queue unrun (their attempt not counted), for
this worker after a restart or any other one; then it exits. A signal while the models
are still loading exits at once. Lost Redis connections are retried with backoff; a
finished batch keeps trying to store its results until Redis answers again.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from typing import Any, Callable, TypeVar

import redis

from service import metrics
from service.broker import connect as redis_conn
from service.broker.consumer import Delivery, StartedJob, WorkerQueue
from service.broker.keys import LayoutError
from service.broker.lanes import SHORT, WORKER_LANES
from service.contract import JobRequest
from service.registry import Registry
from service.settings import Settings
from service.worker.batching import group_by_batch_key
from service.worker.execution import BatchExecutor
from service.worker.heartbeat import Heartbeat, HeldDeliveries
from service.worker.progress import ProgressPump
from service.worker.results import ResultWriter
from service.worker.watch import CallWatcher
from service.worker.runners import Runner, load_runner
from service.adapters.store import AdapterStore
from service.worker.adapters import AdapterSource

__all__ = ["Worker", "run_worker"]

log = logging.getLogger("clusca.worker")
T = TypeVar("T")

_REDIS_ERRORS = redis_conn.UNAVAILABLE


class Worker:
    """One worker process: its models, its queue, and the loop that ties them together.

    In call order: :meth:`load` the models, :meth:`serve` until stopped. Each turn of the
    loop reclaims or reads deliveries, groups them (:mod:`.batching`), starts each group
    and runs it (:mod:`.execution`); the heartbeat thread (:mod:`.heartbeat`) keeps what
    it holds from being reclaimed meanwhile.
    """

    def __init__(self, settings: Settings, registry: Registry, models: list[str] | None = None,
                 worker_id: str | None = None):
        self.settings = settings
        names = models or registry.names
        unknown = [m for m in names if m not in registry]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; the registry has {registry.names}")
        self.entries = [registry.get(m) for m in names]
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.redis = redis_conn.sync_client(settings.redis_url, socket_connect_timeout=2, socket_timeout=10,
                                            health_check_interval=10)
        self.q = WorkerQueue(self.redis, worker_id=self.worker_id, models=names, ttl_s=settings.result_ttl_s,
                             visibility_timeout_s=settings.visibility_timeout_s,
                             max_attempts=settings.max_attempts, lanes=WORKER_LANES[settings.worker_lanes])
        self.models: dict[str, Runner] = {}
        self.stop = threading.Event()
        self.held = HeldDeliveries()
        self._busy = False
        self.results = ResultWriter(self.q, settings, self._retry, self.held.release)
        self.watcher = CallWatcher(self.q, stopping=self.stop)
        self.executor = BatchExecutor(self.models, ProgressPump(self.q), self.results, self.watcher,
                                      worker_id=self.worker_id, max_images=settings.max_batch,
                                      stopping=self.stop, hand_back=self._hand_back)
        self._loaded = False

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        source = AdapterSource(AdapterStore(self.settings.adapters_dir, self.settings.adapter_max_bytes),
                               self.settings.adapter_budget_mb, self.worker_id)
        for e in self.entries:
            self.models[e.name] = load_runner(e, self.settings.device, self.settings.torch_threads, source)
            for reason in metrics.STOP_REASONS:
                metrics.JOBS_STOPPED.labels(e.name, reason)  # exported at zero, before the first stop
        self._loaded = True

    def install_signal_handlers(self) -> None:
        def _stop(signum: int, _frame: Any) -> None:
            self.stop.set()
            if not self._loaded:
                # Nothing is held yet: waiting for the models to finish loading would only delay the stop.
                log.info("%s while loading the models: exiting", signal.Signals(signum).name)
                raise SystemExit(0)
            log.info("%s: stopping; running jobs go back to the queue", signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)

    def serve(self) -> None:
        """Run until stopped. Call :meth:`load` first."""
        self._retry(self.q.ensure_groups, forever=True)
        Heartbeat(self.q, self.held, self.stop, worker_id=self.worker_id,
                  models=lambda: {n: {**r.describe(), "lanes": list(self.q.lanes)} for n, r in self.models.items()},
                  jobs_done=lambda: self.results.jobs_done,
                  visibility_timeout_s=self.settings.visibility_timeout_s).start()
        self.watcher.start()
        log.info("worker %s serving %s", self.worker_id, list(self.models))
        backoff = 0.2
        last_reclaim = 0.0
        reclaim_every = max(0.2, self.settings.visibility_timeout_s / 4)
        while not self.stop.is_set():
            try:
                deliveries: list[Delivery] = []
                if time.monotonic() - last_reclaim >= reclaim_every:
                    last_reclaim = time.monotonic()
                    deliveries = self.q.reclaim(self.settings.max_batch)
                    if deliveries:
                        log.info("took over %d job(s) from unresponsive workers", len(deliveries))
                if not deliveries:
                    deliveries = self._read_batch()
                if deliveries:
                    try:
                        self._process(deliveries)
                    finally:
                        # Whatever was not finished is no longer ours to keep alive: after the
                        # visibility timeout any worker (this one included) may claim it again.
                        self.held.release(deliveries)
                backoff = 0.2
            except _REDIS_ERRORS as exc:
                metrics.ERRORS.labels("redis_unavailable").inc()
                log.warning("redis unavailable (%s); retrying in %.1fs", exc, backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc):  # Redis restarted without persistence
                    self._retry(self.q.ensure_groups, forever=True)
                else:
                    metrics.ERRORS.labels("redis_error").inc()
                    log.exception("redis error")
                    self.stop.wait(1.0)
            except Exception:  # noqa: BLE001 - a bug in one batch must not take the worker down
                metrics.ERRORS.labels("worker").inc()
                log.exception("unexpected error; the affected jobs will be retried after the visibility timeout")
                self.stop.wait(1.0)
        try:
            self.q.leave()
        except _REDIS_ERRORS:
            pass
        self.results.shutdown()
        log.info("worker %s stopped after %d job(s)", self.worker_id, self.results.jobs_done)

    # ------------------------------------------------------------------ reading
    def _read_batch(self) -> list[Delivery]:
        want = self.settings.max_batch
        got = self.q.read(want, block_ms=500)
        # Wait for batch mates only while the queue is busy (the last read found several jobs):
        # for a lone request the wait would be pure latency. The wait polls without BLOCK,
        # because Redis times out blocked reads only at its `hz` tick (100 ms by default).
        if (got and self._busy and len(got) < want and self.settings.batch_wait_ms > 0
                and all(d.lane == SHORT for d in got)):
            deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
            while len(got) < want and time.monotonic() < deadline:
                # Mates of short jobs only: a long job would hold the batch's results until it ended.
                more = self.q.read(want - len(got), block_ms=0, short_only=True)
                if more:
                    got.extend(more)
                else:
                    time.sleep(0.001)
        self._busy = len(got) > 1
        return got

    # ------------------------------------------------------------------ grouping and starting
    def _process(self, deliveries: list[Delivery]) -> None:
        # Short-lane jobs run first: that is what the lanes are for (the sort is stable: FIFO within a lane).
        deliveries = sorted(deliveries, key=lambda d: d.lane != SHORT)
        self.held.hold(deliveries)
        if len(deliveries) == 1 and not self.stop.is_set():
            # Nothing to group: start it at once (saves a round trip on every lone request).
            self._start_and_run(deliveries, {})
            return
        requests = self.q.peek_requests(deliveries)
        known = {d.job_id: r for d, r in zip(deliveries, requests) if r is not None}
        pending = group_by_batch_key(deliveries, [d.model for d in deliveries], requests)
        while pending:
            group = pending.pop(0)
            if self.stop.is_set():
                rest = [d for g in [group, *pending] for d in g]
                self.q.release(rest)
                self.held.release(rest)
                log.info("handed %d unstarted job(s) back to the queue", len(rest))
                return
            self._start_and_run(group, known)

    def _start_and_run(self, group: list[Delivery], known: dict[str, JobRequest]) -> None:
        started, skipped = self.q.start(group, known)
        for d, why in skipped:
            log.info("job %s skipped (%s)", d.job_id, why)
        self.held.release([d for d, _ in skipped])
        if started:
            self.executor.run_group(started)

    def _hand_back(self, jobs: list[StartedJob]) -> None:
        back = self._retry(lambda: self.q.requeue(jobs))
        self.held.release([j.delivery for j in jobs])
        if back is None:
            log.warning("could not hand %d running job(s) back (Redis unreachable); they run again after the "
                        "visibility timeout", len(jobs))
        else:
            log.info("handed %d running job(s) back to the queue", back)

    # ------------------------------------------------------------------ helpers
    def _retry(self, fn: Callable[[], T], forever: bool = False) -> T | None:
        """Call ``fn`` until Redis answers; give up after a while once stopping (returns None)."""
        delay, give_up_at = 0.2, None
        while True:
            try:
                return fn()
            except _REDIS_ERRORS as exc:
                metrics.ERRORS.labels("redis_unavailable").inc()
                if self.stop.is_set() and not forever:
                    give_up_at = give_up_at or time.monotonic() + 30
                    if time.monotonic() > give_up_at:
                        return None
                log.warning("redis unavailable (%s); retrying in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                if forever and self.stop.is_set():
                    return None


def run_worker(settings: Settings, models: list[str] | None = None, worker_id: str | None = None) -> None:
    """Entry point of ``clusca worker``."""
    if not settings.redis_url:
        raise SystemExit("clusca worker: set REDIS_URL (e.g. redis://localhost:6379/0)")
    try:
        registry = Registry.load(settings.models_file)
    except ValueError as exc:
        raise SystemExit(f"configuration error: {exc}") from None
    names = models or registry.names
    grouped = [n for n in names if n in registry and registry.get(n).parallel.world > 1]
    if grouped and not models and len(grouped) < len(names):
        # A worker for "every model" serves those of one process; each group has a worker of its own.
        log.info("not serving %s here: a parallel group has a worker of its own (clusca worker --models NAME)",
                 ", ".join(grouped))
        models = [n for n in names if n not in grouped]
        grouped = []
    if grouped:
        if len(names) > 1:
            raise SystemExit(f"configuration error: model {grouped[0]!r} runs as a parallel group and needs a "
                             f"worker of its own (clusca worker --models {grouped[0]})")
        from service.worker.group import supervise

        try:
            supervise(registry.get(grouped[0]),
                      worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}")
        except ValueError as exc:
            raise SystemExit(f"configuration error: {exc}") from None
        return
    try:
        worker = Worker(settings, registry, models, worker_id)
    except redis_conn.RedisUrlError as exc:
        raise SystemExit(f"configuration error: {exc}") from None
    worker.install_signal_handlers()
    worker.load()
    if settings.worker_metrics_port:
        from prometheus_client import start_http_server

        try:
            start_http_server(settings.worker_metrics_port)
        except OSError as exc:
            log.warning("worker metrics port %d unavailable (%s)", settings.worker_metrics_port, exc)
    try:
        worker.serve()
    except LayoutError as exc:
        raise SystemExit(f"clusca worker: {exc}") from None
