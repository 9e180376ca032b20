"""Job records from the queue as API models: the one place the HTTP answer reads the contract."""

from __future__ import annotations

import base64
from typing import Any

from service.contract import CANCELLED, SUCCEEDED, JobRecord, JobResult, Timings
from service.api.schemas import AdapterInfoOut, GenerateResponse, JobLinks, JobStatus


def links(job_id: str, n_images: int = 0) -> JobLinks:
    return JobLinks(self=f"/jobs/{job_id}", events=f"/jobs/{job_id}/events", cancel=f"/jobs/{job_id}/cancel",
                    images=[f"/jobs/{job_id}/images/{k}" for k in range(n_images)])


def timings(result: JobResult | None) -> Timings:
    return result.timings if result else Timings()


def job_status(job: JobRecord, cls: type[JobStatus] = JobStatus, **extra: Any) -> Any:
    req, res = job.request, job.result
    n = req.num_images if req else 1
    return cls(
        id=job.id, model=job.model, status=job.status, step=job.step, steps=job.steps,
        seed=req.seed if req else None, seeds=req.seeds if req else [], num_images=n,
        output_format=req.output_format if req else "png",
        num_frames=req.num_frames if req else None, fps=req.fps if req else None,
        width=req.width if req else None, height=req.height if req else None,
        guidance=req.guidance if req else None, cache=req.cache if req else None,
        strength=req.strength if req else None, masked=req is not None and req.mask is not None,
        timeout_s=req.timeout_s if req else None,
        adapters=[{"name": a.name, "scale": a.scale} for a in req.adapters] if req else [],
        adapter_load_s=res.adapter_load_s if res else None,
        cache_stats=res.cache_stats if res else None, timings=timings(res), attempts=job.attempts,
        batch_images=res.batch_images if res else None, error=job.error,
        created_at=job.created, started_at=job.started, finished_at=job.finished,
        links=links(job.id, n if job.status == SUCCEEDED else 0), **extra)


def generate_response(job: JobRecord, images: list[bytes], inline: bool = True) -> GenerateResponse:
    """The answer with its outputs inlined; videos only when ``inline`` (they are linked anyway)."""
    if job.request is not None and job.request.is_video and not inline:
        images = []
    return job_status(job, GenerateResponse, images=[base64.b64encode(b).decode() for b in images])


def unfinished_status(job: JobRecord) -> int:
    """The HTTP status of a synchronous answer whose job did not succeed: 408 when it ran past the
    deadline its client set, 409 when it was cancelled, 422 when an adapter it names could not be
    used (removed, or refused by the worker), 500 when it failed (a fault of the server)."""
    if job.deadline_exceeded:
        return 408
    if job.adapter_unavailable:
        return 422
    return 409 if job.status == CANCELLED else 500


def adapter_out(a: Any, problem: str | None) -> AdapterInfoOut:
    """A stored adapter (``service.adapters.store.StoredAdapter``) as GET /models lists it."""
    info = a.info
    return AdapterInfoOut(name=a.name, source=a.source, loads=problem is None, problem=problem,
                          rank=info.rank if info else None, target_modules=info.target_modules if info else [],
                          layers=len(info.layers) if info else None, size_bytes=info.size_bytes if info else None)
