"""Job records from Redis as API models."""

from __future__ import annotations

import base64
from typing import Any

from .schemas import GenerateResponse, JobLinks, JobStatus, Timings


def links(job_id: str, n_images: int = 0) -> JobLinks:
    return JobLinks(self=f"/jobs/{job_id}", events=f"/jobs/{job_id}/events", cancel=f"/jobs/{job_id}/cancel",
                    images=[f"/jobs/{job_id}/images/{k}" for k in range(n_images)])


def job_status(job: dict[str, Any], cls: type[JobStatus] = JobStatus, **extra: Any) -> Any:
    req = job.get("request") or {}
    res = job.get("result") or {}
    n = int(req.get("num_images", 1))
    seed = req.get("seed")
    done = job["status"] == "succeeded"
    return cls(
        id=job["id"], model=job["model"], status=job["status"], step=job["step"], steps=job["steps"],
        seed=seed, seeds=[seed + k for k in range(n)] if seed is not None else [],
        num_images=n, output_format=req.get("output_format", "png"),
        width=req.get("width"), height=req.get("height"), guidance=req.get("guidance"),
        cache=req.get("cache") or {}, cache_stats=res.get("cache_stats"),
        timings=Timings(**res["timings"]) if res.get("timings") else Timings(),
        attempts=job["attempts"], batch_images=res.get("batch_images"), error=job.get("error") or None,
        created_at=job.get("created"), started_at=job.get("started"), finished_at=job.get("finished"),
        links=links(job["id"], n if done else 0), **extra)


def generate_response(job: dict[str, Any], images: list[bytes]) -> GenerateResponse:
    return job_status(job, GenerateResponse, images=[base64.b64encode(b).decode() for b in images])
