"""Running started jobs on their model: one runner call per batch, outcomes, metrics.

A group of started jobs (equal batch keys) is cut into calls (:mod:`.batching`); each
call runs once on the model's runner with a step callback that publishes progress and
stops the call when every job in it was cancelled. A call that fails is run again job by
job, so one bad request (or a batch too large for memory) fails only itself. Each job's
share of the images is encoded and stored with its statistics (:mod:`.results`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import Any, Callable

from service import metrics
from service.broker.consumer import StartedJob
from service.contract import CANCELLED, FAILED, SUCCEEDED, JobResult, RunStats, Timings
from service.outputs.encode import encode_output
from service.outputs.store import NotKept
from service.worker.batching import shares, split_into_calls
from service.worker.edit_inputs import MISSING, load_inputs
from service.worker.progress import ProgressPump, progress_by_job
from service.worker.results import Outcome, ResultWriter
from service.worker.adapters import AdapterUnavailable
from service.worker.runners import Batch, RequestNotSupported, Runner
from service.worker.watch import CallWatch, CallWatcher

log = logging.getLogger("clusca.worker")


class BatchExecutor:
    """Runs groups of started jobs on warm runners and hands their outcomes to the result writer."""

    def __init__(self, models: dict[str, Runner], progress: ProgressPump, results: ResultWriter,
                 watcher: CallWatcher, *, worker_id: str, max_images: int, stopping: threading.Event | None = None,
                 hand_back: Callable[[list[StartedJob]], None] | None = None):
        self.models = models
        # Set when the worker stops (the watcher then stops the running call within a block): the
        # call's jobs still in it are handed back (``hand_back``) to run again, after a restart or
        # on another worker, instead of being finished.
        self.stopping = stopping or threading.Event()
        self.hand_back = hand_back
        self.progress = progress
        self.watcher = watcher
        self.results = results
        self.worker_id = worker_id
        self.max_images = max_images

    def run_group(self, jobs: list[StartedJob]) -> None:
        runner = self.models[jobs[0].delivery.model]
        cap = runner.entry.limits.max_video_pixels
        slots = runner.adapters.slots if runner.adapters is not None else None
        for call in split_into_calls(jobs, [j.request for j in jobs], self.max_images, cap, slots):
            self.run_call(call)

    def run_call(self, jobs: list[StartedJob]) -> None:
        if self.handed_back(jobs):
            return
        model_name = jobs[0].delivery.model
        runner = self.models[model_name]
        jobs = self.without_unavailable_adapters(runner, jobs)
        if not jobs:
            return
        inputs: list[Any] | None = None
        if jobs[0].request.is_edit:
            inputs, gone = load_inputs(self.results.q, self.results.videos, jobs)
            if gone:
                self.results.fail(gone, MISSING)
                jobs = [j for j in jobs if j not in gone]
                if not jobs:
                    return
        batch = Batch.of([j.request for j in jobs], inputs)
        mode = jobs[0].request.cache_mode
        watch = CallWatch(jobs, self._end_job)
        for j in jobs:
            if j.cancel_requested:
                watch.cancel(j.delivery.job_id)
        watch.expire()  # a job whose deadline passed in the queue is not run
        step_times: list[float] = []
        t_last = time.perf_counter()

        def on_step(step: int) -> bool:
            nonlocal t_last
            now = time.perf_counter()
            step_times.append(now - t_last)
            t_last = now
            self.progress.publish(watch.live(), step, batch.steps, watch)
            return watch.all_ended()

        error = ""
        images: list[Any] = []
        stats: RunStats | None = None
        stopped = False
        adapter_load_s: float | None = None
        t0 = time.perf_counter()
        if not watch.all_ended():
            self.watcher.watch(watch)
            try:
                out = runner.run(batch, on_step, watch.stop)
                images, stats, stopped = out.images, out.stats, out.stopped
                adapter_load_s = out.adapter_load_s
            except RequestNotSupported as exc:
                self.results.fail([j for j in jobs if j.delivery.job_id not in watch.close()], str(exc))
                return
            except AdapterUnavailable as exc:
                # Its load failed (the file changed or turned out not to fit): the jobs naming it fail
                # with the reason, the others run without them.
                left = watch.close()
                mine = [j for j in jobs if j.delivery.job_id not in left and exc.name in {a.name for a in j.request.adapters}]
                self.results.fail(mine, str(exc))
                rest = [j for j in jobs if j.delivery.job_id not in left and j not in mine]
                if rest:
                    self.progress.flush()
                    self.run_call(rest)
                return
            except Exception as exc:  # noqa: BLE001 - any model failure fails its jobs, not the worker
                error = f"{type(exc).__name__}: {exc}"[:500]
                metrics.ERRORS.labels("pipeline").inc()
                if len(jobs) > 1:
                    # One bad request (or the batch's size, as with out of memory) must not fail its batch
                    # mates: run each job alone, so only the jobs that fail by themselves are failed.
                    log.warning("batch of %d job(s) failed (%s); running each alone", len(jobs), error)
                    self.progress.flush()
                    left = watch.close()
                    for j in jobs:
                        if j.delivery.job_id not in left:
                            self.run_call([j])
                    return
                log.exception("job %s failed", jobs[0].delivery.job_id)
            finally:
                self.watcher.unwatch(watch)
        inference_s = time.perf_counter() - t0
        left = watch.close()
        if stopped and self.handed_back([j for j in jobs if j.delivery.job_id not in left]):
            return
        # The steps not sent yet go out with each job's result, before its final event.
        progress = progress_by_job(self.progress.take())
        staying = [(k, j) for k, j in enumerate(jobs) if j.delivery.job_id not in left]
        if staying:
            self.results.store(self.outcomes(jobs, staying, images, stats, error, inference_s, batch.images,
                                             adapter_load_s), progress)
        # Observed once the results are stored, so that clients do not wait for it.
        if not error and staying:
            observe_run(model_name, mode, inference_s, step_times, stats)

    def handed_back(self, jobs: list[StartedJob]) -> bool:
        """When the worker is stopping: hand ``jobs`` back unrun (their progress so far dropped); True if so."""
        if not jobs or self.hand_back is None or not self.stopping.is_set():
            return False
        self.progress.take()
        self.hand_back(jobs)
        return True

    def without_unavailable_adapters(self, runner: Runner, jobs: list[StartedJob]) -> list[StartedJob]:
        """``jobs`` less those naming an adapter the model cannot use now (removed since the job was
        queued, changed into a file that does not fit): those fail at once with the reason."""
        if runner.adapters is None or not any(j.request.adapters for j in jobs):
            return jobs
        keep = []
        for j in jobs:
            problem = runner.adapters.problems(j.request.adapters) if j.request.adapters else None
            if problem is None:
                keep.append(j)
            else:
                log.info("job %s: %s", j.delivery.job_id, problem)
                self.results.fail([j], problem)
        return keep

    def outcomes(self, jobs: list[StartedJob], staying: list[tuple[int, StartedJob]], images: list[Any],
                 stats: RunStats | None, error: str, inference_s: float, batch_images: int,
                 adapter_load_s: float | None = None) -> list[Outcome]:
        """The outcome of each job still in the call (``(place in the call, job)``): its share of
        the images (encoded) and the call's statistics."""
        mine_by_place = shares([j.request for j in jobs], images)
        out = []
        for k, j in staying:
            r = j.request
            result = self._result(j, stats, batch_images, len(jobs), inference_s)
            if adapter_load_s is not None and r.adapters:
                result = replace(result, adapter_load_s=round(adapter_load_s, 6))
            if error:
                out.append(Outcome(j, FAILED, result, error))
                continue
            encoded = [encode_output(im, r.output_format, r.fps if r.is_video else None) for im in mine_by_place[k]]
            try:
                stored = self.results.keep(j.delivery.job_id, r, encoded)
            except NotKept as exc:
                out.append(Outcome(j, FAILED, result, str(exc)))
            else:
                out.append(Outcome(j, SUCCEEDED, result, "", stored))
        return out

    def _result(self, j: StartedJob, stats: RunStats | None, batch_images: int, batch_jobs: int,
                inference_s: float | None) -> JobResult:
        r = j.request
        return JobResult(seed=r.seed, seeds=r.seeds, cache_stats=stats, cache_mode=r.cache_mode,
                         batch_images=batch_images, batch_jobs=batch_jobs, worker=self.worker_id,
                         attempt=j.attempt, content_type=r.content_type,
                         timings=Timings(queue_wait_s=round(j.started - j.created, 6),
                                         inference_s=None if inference_s is None else round(inference_s, 6)))

    def _end_job(self, job: StartedJob, status: str, error: str) -> None:
        """Finish a job that left its running call (cancelled, or past its deadline) right away."""
        log.info("job %s %s: %s", job.delivery.job_id, status, error)
        reason = "cancelled" if status == CANCELLED else "deadline"
        self.results.store([Outcome(job, status, self._result(job, None, job.request.num_images, 1, None), error)])
        metrics.JOBS_STOPPED.labels(job.delivery.model, reason).inc()

def observe_run(model: str, mode: str, inference_s: float, step_times: list[float], stats: RunStats | None) -> None:
    """A finished call's latency and cache effect, as metrics."""
    metrics.INFERENCE.labels(model, mode).observe(inference_s)
    step_metric = metrics.STEP.labels(model, mode)
    for s in step_times:
        step_metric.observe(s)
    if stats is None:
        return
    metrics.TOKEN_FRACTION.labels(model, mode).observe(stats.token_fraction)
    metrics.FLOPS_SPEEDUP.labels(model, mode).observe(stats.flops_speedup)
    metrics.GRAPH_REPLAYS.labels(model, mode).inc(stats.graph_replays)
    metrics.GUARD_TRIPS.labels(model, mode).inc(stats.guard_trips)
