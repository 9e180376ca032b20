"""Storing job outcomes: the result with its images and last progress, then metrics and webhooks.

Storing a result and acknowledging its stream entry is one atomic step in the queue, so a
job is acknowledged only once its result is safe, and a job that two workers raced on is
stored once; only the worker that stored it counts it and sends its webhook.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from service import metrics
from service.outputs import store as video_store
from service.contract import FAILED, SUCCEEDED, JobRequest, JobResult, Timings
from service.broker.consumer import StartedJob, WorkerQueue
from service.settings import Settings
from service.outputs.store import RedisStore
from service.webhooks import deliver

log = logging.getLogger("clusca.worker")
T = TypeVar("T")


@dataclass
class Outcome:
    """How one job ended: its status, result, error text and encoded images."""

    job: StartedJob
    status: str
    result: JobResult
    error: str = ""
    images: list[bytes] = dataclasses.field(default_factory=list)


class ResultWriter:
    """Writes outcomes through a retrying call (the worker's: it waits out Redis outages)."""

    def __init__(self, q: WorkerQueue, settings: Settings, retry: Callable[[Callable[[], T]], T | None],
                 release: Callable[[list[Any]], None]):
        self.q = q
        self.settings = settings
        self._retry = retry
        self._release = release
        self.jobs_done = 0
        self._inline = RedisStore(settings.max_output_bytes)
        self.videos = video_store.from_settings(settings)
        self.videos.sweep()
        # Webhooks go out in the background (a slow receiver must not stall the GPU), a few at a time.
        self._webhooks = ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook")

    def keep(self, job_id: str, request: JobRequest, encoded: list[bytes]) -> list[bytes]:
        """What the job's outputs hash will hold for ``encoded``: videos go to the video store,
        still images stay in Redis; raises :class:`~service.outputs.store.NotKept`."""
        store = self.videos if request.is_video else self._inline
        kept: list[bytes] = []
        try:
            for k, data in enumerate(encoded):
                kept.append(store.put(job_id, k, data, request.output_format))
        except video_store.NotKept:
            store.delete(kept)
            raise
        return kept

    def store(self, outcomes: list[Outcome], progress: dict[str, tuple[list[str], int]] | None = None) -> None:
        """Store each outcome with the job's progress events not sent yet (``{job_id: (events, step)}``)."""
        for o in outcomes:
            j = o.job
            now = time.time()
            t = o.result.timings
            timings = Timings(queue_wait_s=round(j.started - j.created, 6) if t.queue_wait_s is None else t.queue_wait_s,
                              inference_s=0.0 if t.inference_s is None else t.inference_s,
                              total_s=round(now - j.created, 6))
            result = dataclasses.replace(o.result, timings=timings)
            events, step = (progress or {}).get(j.delivery.job_id, ((), None))
            stored = self._retry(lambda: self.q.finish(j, o.status, result, o.error, o.images, events, step))
            self._release([j.delivery])
            if not stored:
                # Files this outcome wrote are referenced by nothing (the job is retried, or another
                # worker's outcome was stored): remove them now rather than at their expiry.
                self.videos.delete(o.images)
            if stored is None:
                log.error("job %s: result not stored (redis unreachable); it will be retried", j.delivery.job_id)
                continue
            if not stored:
                log.info("job %s was already finished elsewhere; result discarded", j.delivery.job_id)
                continue
            self.jobs_done += 1
            self._observe(o, result, now)
            if j.request.webhook_url:
                self._webhook(o, result)

    def fail(self, jobs: list[StartedJob], reason: str) -> None:
        self.store([Outcome(j, FAILED, JobResult(seed=j.request.seed), reason) for j in jobs])

    def _observe(self, o: Outcome, result: JobResult, now: float) -> None:
        model, mode, j = o.job.delivery.model, result.cache_mode, o.job
        if o.status == SUCCEEDED:
            metrics.REQUEST_LATENCY.labels(model, mode).observe(now - j.created)
            metrics.QUEUE_WAIT.labels(model).observe(j.started - j.created)
            r = j.request
            if r.is_video:
                frames = (r.num_frames or 0) * len(o.images)
                metrics.FRAMES.labels(model, mode).inc(frames)
                batch_frames = (r.num_frames or 0) * (result.batch_images or len(o.images))
                if batch_frames and result.timings.inference_s:
                    metrics.FRAME_SECONDS.labels(model, mode).observe(result.timings.inference_s / batch_frames)
            else:
                metrics.IMAGES.labels(model, mode).inc(len(o.images))
        elif o.status == FAILED:
            metrics.ERRORS.labels("job_failed").inc()

    def _webhook(self, o: Outcome, result: JobResult) -> None:
        job_id = o.job.delivery.job_id
        payload = {"id": job_id, "status": o.status, "model": o.job.delivery.model, "error": o.error or None,
                   "image_urls": [f"/jobs/{job_id}/images/{k}" for k in range(len(o.images))], **result.to_dict()}
        self._webhooks.submit(deliver, o.job.request.webhook_url, payload, secret=self.settings.webhook_secret,
                              allow_private=self.settings.webhook_allow_private)

    def shutdown(self) -> None:
        self._webhooks.shutdown(wait=True, cancel_futures=False)
