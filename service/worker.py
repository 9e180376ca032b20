"""The worker process: warm models, batched runs, progress, results.

A worker loads each of its models once (a :class:`~service.runners.Runner` per model),
then loops: read new jobs (and jobs a dead worker left behind), group the compatible
ones (equal :meth:`~service.contract.JobRequest.batch_key`), run each group as ONE
runner call with one seed per image (so an image depends only on its own seed, not on
its batch mates), publish per-step progress (:mod:`service.progress`), and store the
results (:mod:`service.results`). The worker knows no model kind: loading, calling
conventions and statistics are the runners'.

SIGTERM (or SIGINT) lets the running batch finish, hands back jobs it had read but not
started, then exits. Lost Redis connections are retried with backoff; a finished
batch keeps trying to store its results until Redis answers again.
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

from . import metrics, redis_conn
from .contract import CANCELLED, FAILED, SUCCEEDED, JobResult, Timings
from .images import encode_output
from .keys import LayoutError
from .progress import PROGRESS_INTERVAL_S, ProgressPump, progress_by_job
from .queue import HEARTBEAT_S, Delivery, StartedJob, WorkerQueue
from .registry import Registry
from .results import Outcome, ResultWriter
from .runners import Batch, RequestNotSupported, Runner, load_runner
from .settings import Settings
from .video_store import NotKept

__all__ = ["Worker", "run_worker", "ProgressPump", "progress_by_job", "PROGRESS_INTERVAL_S"]

log = logging.getLogger("clusca.worker")
T = TypeVar("T")

_REDIS_ERRORS = redis_conn.UNAVAILABLE


class Worker:
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
                             max_attempts=settings.max_attempts)
        self.models: dict[str, Runner] = {}
        self.stop = threading.Event()
        self._held: dict[str, Delivery] = {}
        self._held_lock = threading.Lock()
        self._busy = False
        self._progress = ProgressPump(self.q)
        self.results = ResultWriter(self.q, settings, self._retry, self._unhold)

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        for e in self.entries:
            self.models[e.name] = load_runner(e, self.settings.device, self.settings.torch_threads)

    def install_signal_handlers(self) -> None:
        def _stop(signum: int, _frame: Any) -> None:
            log.info("signal %d: finishing the running batch, then exiting", signum)
            self.stop.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)

    def serve(self) -> None:
        """Run until stopped. Call :meth:`load` first."""
        self._retry(self.q.ensure_groups, forever=True)
        hb = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        hb.start()
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
                        self._unhold(deliveries)
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
        if got and self._busy and len(got) < want and self.settings.batch_wait_ms > 0:
            deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
            while len(got) < want and time.monotonic() < deadline:
                more = self.q.read(want - len(got), block_ms=0)
                if more:
                    got.extend(more)
                else:
                    time.sleep(0.001)
        self._busy = len(got) > 1
        return got

    def _process(self, deliveries: list[Delivery]) -> None:
        self._hold(deliveries)
        if len(deliveries) == 1 and not self.stop.is_set():
            # Nothing to group: start it at once (saves a round trip on every lone request).
            started, skipped = self.q.start(deliveries)
            for d, why in skipped:
                log.info("job %s skipped (%s)", d.job_id, why)
            if started:
                self._run_group(started)
            return
        requests = self.q.peek_requests(deliveries)
        groups: dict[str, list[Delivery]] = {}
        for d, req in zip(deliveries, requests):
            key = req.batch_key(d.model) if req else f"missing:{d.entry_id}"
            groups.setdefault(key, []).append(d)
        pending = list(groups.values())
        while pending:
            group = pending.pop(0)
            if self.stop.is_set():
                rest = [d for g in [group, *pending] for d in g]
                self.q.release(rest)
                self._unhold(rest)
                log.info("handed %d unstarted job(s) back to the queue", len(rest))
                return
            started, skipped = self.q.start(group)
            for d, why in skipped:
                log.info("job %s skipped (%s)", d.job_id, why)
            self._unhold([d for d, _ in skipped])
            if started:
                self._run_group(started)

    # ------------------------------------------------------------------ running
    def _run_group(self, jobs: list[StartedJob]) -> None:
        # Split by image count so one call never holds more than max_batch images, and (videos)
        # never more than the model's max_video_pixels of width x height x frames (one job always fits).
        chunk: list[StartedJob] = []
        images = pixels = 0
        cap = self.models[jobs[0].delivery.model].entry.limits.max_video_pixels
        for j in jobs:
            r = j.request
            n = r.num_images
            p = n * r.width * r.height * (r.num_frames or 0)
            if chunk and (images + n > self.settings.max_batch or (cap is not None and pixels + p > cap)):
                self._run_batch(chunk)
                chunk, images, pixels = [], 0, 0
            chunk.append(j)
            images += n
            pixels += p
        if chunk:
            self._run_batch(chunk)

    def _run_batch(self, jobs: list[StartedJob]) -> None:
        model_name = jobs[0].delivery.model
        runner = self.models[model_name]
        batch = Batch.of([j.request for j in jobs])
        mode = jobs[0].request.cache_mode
        cancelled = [j.cancel_requested for j in jobs]
        step_times: list[float] = []
        t_last = time.perf_counter()

        def on_step(step: int) -> bool:
            nonlocal t_last
            now = time.perf_counter()
            step_times.append(now - t_last)
            t_last = now
            self._progress.publish(jobs, step, batch.steps, cancelled)
            return all(cancelled)

        error = ""
        images: list[Any] = []
        stats: dict[str, Any] = {}
        t0 = time.perf_counter()
        if not all(cancelled):
            try:
                out = runner.run(batch, on_step)
                images, stats = out.images, out.stats
            except RequestNotSupported as exc:
                self.results.fail(jobs, str(exc))
                return
            except Exception as exc:  # noqa: BLE001 - any model failure fails its jobs, not the worker
                error = f"{type(exc).__name__}: {exc}"[:500]
                metrics.ERRORS.labels("pipeline").inc()
                if len(jobs) > 1:
                    # One bad request (or the batch's size, as with out of memory) must not fail its batch
                    # mates: run each job alone, so only the jobs that fail by themselves are failed.
                    log.warning("batch of %d job(s) failed (%s); running each alone", len(jobs), error)
                    self._progress.flush()
                    for j in jobs:
                        self._run_batch([j])
                    return
                log.exception("job %s failed", jobs[0].delivery.job_id)
        inference_s = time.perf_counter() - t0
        # The steps not sent yet go out with each job's result, before its final event.
        progress = progress_by_job(self._progress.take())
        self.results.store(self._outcomes(jobs, cancelled, images, stats, error, inference_s, batch.images),
                           progress)
        # Observed once the results are stored, so that clients do not wait for it.
        if not error and not all(cancelled):
            metrics.INFERENCE.labels(model_name, mode).observe(inference_s)
            step_metric = metrics.STEP.labels(model_name, mode)
            for s in step_times:
                step_metric.observe(s)
            if "token_fraction" in stats:
                metrics.TOKEN_FRACTION.labels(model_name, mode).observe(float(stats["token_fraction"]))
            if "flops_speedup" in stats:
                metrics.FLOPS_SPEEDUP.labels(model_name, mode).observe(float(stats["flops_speedup"]))
            metrics.GRAPH_REPLAYS.labels(model_name, mode).inc(int(stats.get("graph_replays", 0)))

    def _outcomes(self, jobs: list[StartedJob], cancelled: list[bool], images: list[Any], stats: dict[str, Any],
                  error: str, inference_s: float, batch_images: int) -> list[Outcome]:
        """Each job's outcome of one batch: its share of the images (encoded) and the batch's statistics."""
        out = []
        offset = 0
        for j, was_cancelled in zip(jobs, cancelled):
            r = j.request
            mine = images[offset:offset + r.num_images]
            offset += r.num_images
            result = JobResult(seed=r.seed, seeds=r.seeds, cache_stats=stats, cache_mode=r.cache_mode,
                               batch_images=batch_images, batch_jobs=len(jobs), worker=self.worker_id,
                               attempt=j.attempt, content_type=r.content_type,
                               timings=Timings(queue_wait_s=round(j.started - j.created, 6),
                                               inference_s=round(inference_s, 6)))
            if was_cancelled:
                out.append(Outcome(j, CANCELLED, result, "cancelled by the client"))
            elif error:
                out.append(Outcome(j, FAILED, result, error))
            else:
                encoded = [encode_output(im, r.output_format, r.fps if r.is_video else None) for im in mine]
                try:
                    stored = self.results.keep(j.delivery.job_id, r, encoded)
                except NotKept as exc:
                    out.append(Outcome(j, FAILED, result, str(exc)))
                else:
                    out.append(Outcome(j, SUCCEEDED, result, "", stored))
        return out

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

    def _hold(self, ds: list[Delivery]) -> None:
        with self._held_lock:
            for d in ds:
                self._held[d.entry_id] = d

    def _unhold(self, ds: list[Delivery]) -> None:
        with self._held_lock:
            for d in ds:
                self._held.pop(d.entry_id, None)

    def _heartbeat_loop(self) -> None:
        info = {"id": self.worker_id, "pid": os.getpid(), "host": socket.gethostname(),
                "models": {n: r.describe() for n, r in self.models.items()}}
        interval = min(HEARTBEAT_S, self.settings.visibility_timeout_s / 3)
        while not self.stop.is_set():
            try:
                with self._held_lock:
                    held = list(self._held.values())
                self.q.heartbeat({**info, "running": len(held), "jobs_done": self.results.jobs_done})
                if held:
                    self.q.touch(held)
                metrics.HEARTBEAT.labels(self.worker_id).set(time.time())
            except Exception as exc:  # noqa: BLE001 - the heartbeat must outlive Redis hiccups
                log.debug("heartbeat failed: %s", exc)
            self.stop.wait(interval)


def run_worker(settings: Settings, models: list[str] | None = None, worker_id: str | None = None) -> None:
    """Entry point of ``clusca worker``."""
    if not settings.redis_url:
        raise SystemExit("clusca worker: set REDIS_URL (e.g. redis://localhost:6379/0)")
    try:
        registry = Registry.load(settings.models_file)
    except ValueError as exc:
        raise SystemExit(f"configuration error: {exc}") from None
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
