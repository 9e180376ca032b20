"""The worker process: warm pipelines, batched runs, progress, results.

A worker loads each of its models once, then loops: read new jobs (and jobs a dead
worker left behind), group the compatible ones, run each group as ONE pipeline call
with one generator per image (so an image depends only on its own seed, not on its
batch mates), publish per-step progress, and store the results. Storing a result and
acknowledging its stream entry is one atomic step, so a job is acknowledged only once
its result is safe, and a job that two workers raced on is stored once.

SIGTERM (or SIGINT) lets the running batch finish, hands back jobs it had read but not
started, then exits. Lost Redis connections are retried with backoff; a finished
batch keeps trying to store its results until Redis answers again.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import redis

from . import metrics
from .pipelines import call_parameters, load_pipeline
from .queue import HEARTBEAT_S, Delivery, StartedJob, WorkerQueue, event_json
from .registry import ModelEntry, Registry
from .settings import Settings
from .webhooks import deliver

log = logging.getLogger("clusca.worker")
T = TypeVar("T")

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_PIL_FORMATS = {"png": ("PNG", {"compress_level": 1}), "jpeg": ("JPEG", {"quality": 95}),
                "webp": ("WEBP", {"quality": 95})}
_REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)
# Least time between two progress round trips of a worker (see ProgressPump). A job of up
# to this length makes no progress round trip of its own: its steps go out with its result.
PROGRESS_INTERVAL_S = 0.25


def encode_image(image: Any, fmt: str) -> bytes:
    name, opts = _PIL_FORMATS[fmt]
    if fmt == "jpeg" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format=name, **opts)
    return buf.getvalue()


def batch_key(model: str, req: dict[str, Any]) -> str:
    """Jobs with equal keys can share one pipeline call."""
    return json.dumps([model, req["width"], req["height"], req["steps"], req["guidance"],
                       req.get("negative_prompt") is None, req["cache"]], sort_keys=True)


def noop_stats(cache: dict[str, Any], steps: int) -> dict[str, Any]:
    # The no-op model has no transformer: every step counts as full and nothing is cached.
    return {"mode": cache.get("mode", "off"), "full_steps": steps, "cached_steps": 0, "token_fraction": 1.0,
            "flops": 0, "flops_uncached": 0, "flops_speedup": 1.0, "cache_bytes": 0, "kmeans_ms": 0.0}


class ProgressPump:
    """Publishes step progress from a background thread, so the denoising loop never waits on Redis.

    Every step still becomes its own progress event, in order, but steps travel in as few
    round trips as possible: a step waits at most ``interval_s``, and all the steps waiting
    go out together in one pipeline (at the latest when the batch ends: :meth:`flush`, or
    :meth:`take` and the worker stores them with the results). A round trip per step cost
    far more than the step's own bookkeeping where steps are short (thread wake-ups and the
    Redis server competing for the cores that run the model); a job shorter than the
    interval costs no round trip during its run at all.

    Each round trip also reads the jobs' cancel flags, which come back through the shared
    ``cancelled`` lists that the step callback checks: a cancel takes effect at most
    ``interval_s`` plus a step after it was asked for.
    """

    def __init__(self, q: WorkerQueue, interval_s: float = PROGRESS_INTERVAL_S):
        self.q = q
        self.interval_s = interval_s
        self._cond = threading.Condition()
        self._pending: list[tuple[list[StartedJob], int, int, list[bool]]] = []
        self._first_at = 0.0  # when the oldest waiting step was published
        self._idle = False  # the thread sleeps until the next step: only then does publish wake it
        self._sending = False  # a round trip is under way (from the thread or from flush)
        self._skip_until = float("-inf")
        threading.Thread(target=self._run, name="progress", daemon=True).start()

    def publish(self, jobs: list[StartedJob], step: int, steps: int, cancelled: list[bool]) -> None:
        with self._cond:
            if not self._pending:
                self._first_at = time.monotonic()
            self._pending.append((jobs, step, steps, cancelled))
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

    def take(self, timeout_s: float = 10.0) -> list[tuple[list[StartedJob], int, int, list[bool]]]:
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

    def _send_owned(self, items: list[tuple[list[StartedJob], int, int, list[bool]]]) -> None:
        """Send ``items`` for the caller that set ``_sending``, then release the round trip."""
        try:
            self._send(items)
        finally:
            with self._cond:
                self._sending = False
                self._cond.notify_all()

    def _send(self, items: list[tuple[list[StartedJob], int, int, list[bool]]]) -> None:
        if not items or time.monotonic() < self._skip_until:
            return
        try:
            self.q.progress(items)
        except Exception:  # noqa: BLE001 - progress is best effort; the result is what must not be lost
            self._skip_until = time.monotonic() + 2.0  # Redis just failed: drop progress, do not fall behind

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


def progress_by_job(items: list[tuple[list[StartedJob], int, int, list[bool]]]) -> dict[str, tuple[list[str], int]]:
    """Progress items as ``{job_id: (event JSON strings in order, latest step)}``."""
    out: dict[str, tuple[list[str], int]] = {}
    for jobs, step, steps, _ in items:
        ev = event_json("progress", step=step, steps=steps)
        for j in jobs:
            events, _ = out.get(j.delivery.job_id, ([], 0))
            events.append(ev)
            out[j.delivery.job_id] = (events, step)
    return out


class _Cancelled(Exception):
    """Raised out of a legacy step callback when every job of the batch was cancelled."""


@dataclass
class Model:
    entry: ModelEntry
    pipe: Any
    device: str
    params: set[str]


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
        self.redis = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=10,
                                          health_check_interval=10)
        self.q = WorkerQueue(self.redis, worker_id=self.worker_id, models=names, ttl_s=settings.result_ttl_s,
                             visibility_timeout_s=settings.visibility_timeout_s,
                             max_attempts=settings.max_attempts)
        self.models: dict[str, Model] = {}
        self.stop = threading.Event()
        self._held: dict[str, Delivery] = {}
        self._held_lock = threading.Lock()
        self._jobs_done = 0
        self._busy = False
        # Webhooks go out in the background (a slow receiver must not stall the GPU), a few at a time.
        self._webhooks = ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook")
        self._progress = ProgressPump(self.q)
        self._torch = None

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        for e in self.entries:
            pipe, device = load_pipeline(e, self.settings.device)
            self.models[e.name] = Model(e, pipe, device, call_parameters(pipe))
        if any(m.entry.kind != "noop" for m in self.models.values()):
            import torch

            if self.settings.torch_threads:
                torch.set_num_threads(self.settings.torch_threads)
            self._torch = torch
        for m in self.models.values():
            if m.entry.kind != "noop" and m.entry.options.get("warmup", True):
                self._warm_up(m)

    def _warm_up(self, model: Model) -> None:
        # The first call of a pipeline pays one-off costs (allocator, kernel selection, lazy
        # imports); paying them here keeps them out of the first client's latency.
        d = model.entry.defaults
        t0 = time.perf_counter()
        try:
            model.pipe(prompt=["warm-up"], num_inference_steps=2, guidance_scale=d.guidance,
                       generator=[self._generator(model, 0)], height=d.height, width=d.width,
                       num_images_per_prompt=1, output_type="pil", **(model.entry.options.get("call_kwargs") or {}))
            log.info("model %s warmed up in %.2fs", model.entry.name, time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - a failed warm-up is logged, requests will tell
            log.warning("warm-up of %s failed: %s", model.entry.name, exc)

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
        self._webhooks.shutdown(wait=True, cancel_futures=False)
        log.info("worker %s stopped after %d job(s)", self.worker_id, self._jobs_done)

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
            key = batch_key(d.model, req) if req else f"missing:{d.entry_id}"
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
        # Split by image count so one call never holds more than max_batch images (one job always fits).
        chunk: list[StartedJob] = []
        images = 0
        for j in jobs:
            n = int(j.request["num_images"])
            if chunk and images + n > self.settings.max_batch:
                self._run_batch(chunk)
                chunk, images = [], 0
            chunk.append(j)
            images += n
        if chunk:
            self._run_batch(chunk)

    def _generator(self, model: Model, seed: int) -> Any:
        if self._torch is None or model.entry.kind == "noop":
            from .noop import SeedGenerator

            return SeedGenerator(seed)
        # CPU generators: the initial noise of a seed is then the same on every device and GPU
        # model, which is what clients expect from "same seed"; drawing it costs next to nothing.
        return self._torch.Generator(device="cpu").manual_seed(seed)

    def _run_batch(self, jobs: list[StartedJob]) -> None:
        d0 = jobs[0].delivery
        model = self.models[d0.model]
        req0 = jobs[0].request
        steps = int(req0["steps"])
        cache = req0["cache"]
        mode = cache.get("mode", "off")
        cancelled = [j.cancel_requested for j in jobs]
        prompts, negatives, gens = [], [], []
        for j in jobs:
            r = j.request
            for k in range(int(r["num_images"])):
                prompts.append(r["prompt"])
                negatives.append(r.get("negative_prompt") or "")
                gens.append(self._generator(model, int(r["seed"]) + k))
        step_times: list[float] = []
        t_last = time.perf_counter()

        def on_step(pipe: Any, i: int, _t: Any, kwargs: dict) -> dict:
            nonlocal t_last
            now = time.perf_counter()
            step_times.append(now - t_last)
            t_last = now
            self._progress.publish(jobs, i + 1, steps, cancelled)
            if all(cancelled):
                pipe._interrupt = True
            return kwargs

        kwargs: dict[str, Any] = dict(prompt=prompts, num_inference_steps=steps, guidance_scale=float(req0["guidance"]),
                                      generator=gens, height=int(req0["height"]), width=int(req0["width"]),
                                      num_images_per_prompt=1, callback_on_step_end=on_step, output_type="pil")
        if req0.get("negative_prompt") is not None:
            kwargs["negative_prompt"] = negatives
        # Operator-set extras for every call of this model (e.g. FLUX's max_sequence_length).
        kwargs.update(model.entry.options.get("call_kwargs") or {})
        if model.params and "*" not in model.params and "callback_on_step_end" not in model.params \
                and "callback" in model.params:
            # Older pipelines (e.g. PixArt) only have `callback(step, timestep, latents)` and no
            # interrupt flag: stop them by raising out of the callback instead.
            def legacy(i: int, t: Any, _latents: Any) -> None:
                on_step(model.pipe, i, t, {})
                if all(cancelled):
                    raise _Cancelled()

            kwargs.pop("callback_on_step_end")
            kwargs.update(callback=legacy, callback_steps=1)
        if "*" not in model.params and model.params:
            dropped = [k for k in kwargs if k not in model.params]
            if "negative_prompt" in dropped:
                self._fail_all(jobs, f"model {d0.model!r} does not support negative_prompt")
                return
            for k in dropped:
                kwargs.pop(k)

        error = ""
        out_images: list[Any] = []
        stats: dict[str, Any] = {}
        t0 = time.perf_counter()
        split = False
        if not all(cancelled):
            try:
                out_images, stats = self._call(model, kwargs, cache, steps)
            except _Cancelled:
                pass
            except Exception as exc:  # noqa: BLE001 - any pipeline failure fails its jobs, not the worker
                error = f"{type(exc).__name__}: {exc}"[:500]
                metrics.ERRORS.labels("pipeline").inc()
                # One bad request (or the batch's size, as with out of memory) must not fail its batch
                # mates: run each job alone, so only the jobs that fail by themselves are failed.
                split = len(jobs) > 1
                if split:
                    log.warning("batch of %d job(s) failed (%s); running each alone", len(jobs), error)
                else:
                    log.exception("job %s failed", d0.job_id)
                self._free_memory()
        if split:
            self._progress.flush()
            for j in jobs:
                self._run_batch([j])
            return
        inference_s = time.perf_counter() - t0
        # The steps not sent yet go out with each job's result, before its final event.
        progress = progress_by_job(self._progress.take())
        outcomes = []
        offset = 0
        n_images = len(prompts)
        for j, was_cancelled in zip(jobs, cancelled):
            r = j.request
            n = int(r["num_images"])
            mine = out_images[offset:offset + n]
            offset += n
            result = {"seed": int(r["seed"]), "seeds": [int(r["seed"]) + k for k in range(n)],
                      "cache_stats": stats, "cache_mode": mode, "batch_images": n_images, "batch_jobs": len(jobs),
                      "worker": self.worker_id, "attempt": j.attempt,
                      "content_type": CONTENT_TYPES[r["output_format"]],
                      "timings": {"queue_wait_s": round(j.started - j.created, 6),
                                  "inference_s": round(inference_s, 6)}}
            if was_cancelled:
                outcomes.append((j, "cancelled", result, "cancelled by the client", []))
            elif error:
                outcomes.append((j, "failed", result, error, []))
            else:
                encoded = [encode_image(im, r["output_format"]) for im in mine]
                outcomes.append((j, "succeeded", result, "", encoded))
        self._store(outcomes, progress)
        # Observed once the results are stored, so that clients do not wait for it.
        if not error and not all(cancelled):
            metrics.INFERENCE.labels(d0.model, mode).observe(inference_s)
            step_metric = metrics.STEP.labels(d0.model, mode)
            for s in step_times:
                step_metric.observe(s)
            if "token_fraction" in stats:
                metrics.TOKEN_FRACTION.labels(d0.model, mode).observe(float(stats["token_fraction"]))
            if "flops_speedup" in stats:
                metrics.FLOPS_SPEEDUP.labels(d0.model, mode).observe(float(stats["flops_speedup"]))

    def _call(self, model: Model, kwargs: dict[str, Any], cache: dict[str, Any],
              steps: int) -> tuple[list[Any], dict[str, Any]]:
        pipe = model.pipe
        if getattr(pipe, "transformer", None) is None:
            return list(pipe(**kwargs).images), noop_stats(cache, steps)
        from clusca import ClusCaConfig, clusca_run

        config = ClusCaConfig.from_dict(cache)
        with self._torch.inference_mode():
            with clusca_run(pipe.transformer, config, num_inference_steps=steps) as run:
                images = list(pipe(**kwargs).images)
        return images, run.stats.to_dict()

    def _free_memory(self) -> None:
        if self._torch is not None and self._torch.cuda.is_available():
            self._torch.cuda.empty_cache()

    def _fail_all(self, jobs: list[StartedJob], reason: str) -> None:
        self._store([(j, "failed", {"seed": j.request["seed"]}, reason, []) for j in jobs])

    def _store(self, outcomes: list[tuple[StartedJob, str, dict, str, list[bytes]]],
               progress: dict[str, tuple[list[str], int]] | None = None) -> None:
        for j, status, result, error, images in outcomes:
            now = time.time()
            result.setdefault("timings", {"queue_wait_s": round(j.started - j.created, 6), "inference_s": 0.0})
            result["timings"]["total_s"] = round(now - j.created, 6)
            events, step = (progress or {}).get(j.delivery.job_id, ((), None))
            stored = self._retry(lambda: self.q.finish(j, status, result, error, images, events, step))
            self._unhold([j.delivery])
            if stored is None:
                log.error("job %s: result not stored (redis unreachable); it will be retried", j.delivery.job_id)
                continue
            if not stored:
                log.info("job %s was already finished elsewhere; result discarded", j.delivery.job_id)
                continue
            self._jobs_done += 1
            model, mode = j.delivery.model, result.get("cache_mode", "off")
            if status == "succeeded":
                metrics.REQUEST_LATENCY.labels(model, mode).observe(now - j.created)
                metrics.QUEUE_WAIT.labels(model).observe(j.started - j.created)
                metrics.IMAGES.labels(model, mode).inc(len(images))
            elif status == "failed":
                metrics.ERRORS.labels("job_failed").inc()
            url = j.request.get("webhook_url")
            if url:
                payload = {"id": j.delivery.job_id, "status": status, "model": model, "error": error or None,
                           "image_urls": [f"/jobs/{j.delivery.job_id}/images/{k}" for k in range(len(images))],
                           **result}
                self._webhooks.submit(deliver, url, payload, secret=self.settings.webhook_secret,
                                      allow_private=self.settings.webhook_allow_private)

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
                "models": {n: {"device": m.device, "kind": m.entry.kind} for n, m in self.models.items()}}
        interval = min(HEARTBEAT_S, self.settings.visibility_timeout_s / 3)
        while not self.stop.is_set():
            try:
                with self._held_lock:
                    held = list(self._held.values())
                self.q.heartbeat({**info, "running": len(held), "jobs_done": self._jobs_done})
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
    worker = Worker(settings, registry, models, worker_id)
    worker.install_signal_handlers()
    worker.load()
    if settings.worker_metrics_port:
        from prometheus_client import start_http_server

        try:
            start_http_server(settings.worker_metrics_port)
        except OSError as exc:
            log.warning("worker metrics port %d unavailable (%s)", settings.worker_metrics_port, exc)
    worker.serve()
