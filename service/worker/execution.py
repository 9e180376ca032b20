"""Running started jobs on their model: one runner call per batch, outcomes, metrics.

A group of started jobs (equal batch keys) is cut into calls (:mod:`.batching`); each
call runs once on the model's runner with a step callback that publishes progress and
stops the call when every job in it was cancelled. A call that fails is run again job by
job, so one bad request (or a batch too large for memory) fails only itself. Each job's
share of the images is encoded and stored with its statistics (:mod:`.results`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from service import metrics
from service.broker.consumer import StartedJob
from service.contract import CANCELLED, FAILED, SUCCEEDED, JobResult, Timings
from service.outputs.encode import encode_output
from service.outputs.store import NotKept
from service.worker.batching import shares, split_into_calls
from service.worker.progress import ProgressPump, progress_by_job
from service.worker.results import Outcome, ResultWriter
from service.worker.runners import Batch, RequestNotSupported, Runner

log = logging.getLogger("clusca.worker")


class BatchExecutor:
    """Runs groups of started jobs on warm runners and hands their outcomes to the result writer."""

    def __init__(self, models: dict[str, Runner], progress: ProgressPump, results: ResultWriter, *,
                 worker_id: str, max_images: int):
        self.models = models
        self.progress = progress
        self.results = results
        self.worker_id = worker_id
        self.max_images = max_images

    def run_group(self, jobs: list[StartedJob]) -> None:
        cap = self.models[jobs[0].delivery.model].entry.limits.max_video_pixels
        for call in split_into_calls(jobs, [j.request for j in jobs], self.max_images, cap):
            self.run_call(call)

    def run_call(self, jobs: list[StartedJob]) -> None:
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
            self.progress.publish(jobs, step, batch.steps, cancelled)
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
                    self.progress.flush()
                    for j in jobs:
                        self.run_call([j])
                    return
                log.exception("job %s failed", jobs[0].delivery.job_id)
        inference_s = time.perf_counter() - t0
        # The steps not sent yet go out with each job's result, before its final event.
        progress = progress_by_job(self.progress.take())
        self.results.store(self.outcomes(jobs, cancelled, images, stats, error, inference_s, batch.images),
                           progress)
        # Observed once the results are stored, so that clients do not wait for it.
        if not error and not all(cancelled):
            observe_run(model_name, mode, inference_s, step_times, stats)

    def outcomes(self, jobs: list[StartedJob], cancelled: list[bool], images: list[Any], stats: dict[str, Any],
                 error: str, inference_s: float, batch_images: int) -> list[Outcome]:
        """Each job's outcome of one call: its share of the images (encoded) and the call's statistics."""
        out = []
        for j, was_cancelled, mine in zip(jobs, cancelled, shares([j.request for j in jobs], images)):
            r = j.request
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


def observe_run(model: str, mode: str, inference_s: float, step_times: list[float], stats: dict[str, Any]) -> None:
    """A finished call's latency and cache effect, as metrics."""
    metrics.INFERENCE.labels(model, mode).observe(inference_s)
    step_metric = metrics.STEP.labels(model, mode)
    for s in step_times:
        step_metric.observe(s)
    if "token_fraction" in stats:
        metrics.TOKEN_FRACTION.labels(model, mode).observe(float(stats["token_fraction"]))
    if "flops_speedup" in stats:
        metrics.FLOPS_SPEEDUP.labels(model, mode).observe(float(stats["flops_speedup"]))
    metrics.GRAPH_REPLAYS.labels(model, mode).inc(int(stats.get("graph_replays", 0)))
    metrics.GUARD_TRIPS.labels(model, mode).inc(int(stats.get("guard_trips", 0)))
