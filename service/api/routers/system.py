"""Health, readiness, the model list and Prometheus metrics."""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from ... import metrics
from ...queue import ALIVE_WINDOW_S, worker_key, workers_key
from ..deps import AuthDep, ServicesDep
from ..schemas import ErrorBody, Health, ModelInfo, ModelsResponse, Readiness

router = APIRouter(tags=["system"])


@router.get("/healthz", response_model=Health, summary="Liveness: the API process answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, summary="Readiness: Redis reachable and a worker alive",
            responses={503: {"model": Readiness}})
async def readyz(services: ServicesDep) -> Any:
    try:
        await services.redis.ping()
        alive = {m: await services.queue.workers_alive(m) for m in services.registry.names}
    except Exception:  # noqa: BLE001 - any Redis failure means not ready
        body = Readiness(status="not_ready", redis=False, reason="redis unreachable")
        return JSONResponse(body.model_dump(), status_code=503)
    if not any(alive.values()):
        body = Readiness(status="not_ready", redis=True, workers_alive=alive, reason="no live worker")
        return JSONResponse(body.model_dump(), status_code=503)
    return Readiness(status="ready", redis=True, workers_alive=alive)


@router.get("/models", response_model=ModelsResponse, summary="Models, their defaults and where they run",
            responses={401: {"model": ErrorBody}, 503: {"model": ErrorBody}})
async def models(services: ServicesDep, _: AuthDep) -> ModelsResponse:
    q = services.queue
    workers: dict[str, list[dict[str, Any]]] = {}
    # Live workers come from the per-model heartbeat sets (never a keyspace scan: Redis holds
    # every job's keys too), their details from each worker's own short-lived record.
    ids: set[str] = set()
    for name in services.registry.names:
        ids.update(m.decode() if isinstance(m, bytes) else m
                   for m in await services.redis.zrangebyscore(workers_key(name), time.time() - ALIVE_WINDOW_S, "+inf"))
    keys = sorted(ids)
    for raw in (await services.redis.mget([worker_key(k) for k in keys])) if keys else []:
        if raw:
            info = json.loads(raw)
            for name, where in (info.get("models") or {}).items():
                workers.setdefault(name, []).append({"id": info.get("id"), "host": info.get("host"),
                                                     "device": where.get("device"), "running": info.get("running")})
    out = []
    for e in services.registry.entries():
        out.append(ModelInfo(**e.public(), limits=e.limits_within(services.settings), workers_alive=await q.workers_alive(e.name),
                             queue_depth=await q.depth(e.name), running_jobs=await q.running(e.name),
                             workers=workers.get(e.name, [])))
    return ModelsResponse(default_model=services.settings.default_model, models=out)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
async def prometheus(services: ServicesDep) -> Response:
    text = metrics.process_metrics()
    try:
        values: dict[str, dict[str, int]] = {"clusca_queue_depth": {}, "clusca_running_jobs": {},
                                             "clusca_workers_alive": {}}
        for m in services.registry.names:
            values["clusca_queue_depth"][m] = await services.queue.depth(m)
            values["clusca_running_jobs"][m] = await services.queue.running(m)
            values["clusca_workers_alive"][m] = await services.queue.workers_alive(m)
        text += metrics.queue_metrics(values)
    except Exception:  # noqa: BLE001 - process metrics are still worth serving without Redis
        metrics.ERRORS.labels("redis_unavailable").inc()
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")
