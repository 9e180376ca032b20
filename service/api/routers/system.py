"""Health, readiness, the model list and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from service import metrics
from service.api.deps import AuthDep, ServicesDep
from service.api.readiness import lane_warnings
from service.api.views import adapter_out
from service.api.schemas import ErrorBody, Health, ModelInfo, ModelsResponse, Readiness

router = APIRouter(tags=["system"])


@router.get("/healthz", response_model=Health, summary="Liveness: the API process answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, summary="Readiness: Redis reachable and a worker alive",
            responses={503: {"model": Readiness}})
async def readyz(services: ServicesDep) -> Any:
    try:
        await services.queue.ping()
        alive = {m: await services.queue.workers_alive(m) for m in services.registry.names}
    except Exception:  # noqa: BLE001 - any Redis failure means not ready
        body = Readiness(status="not_ready", redis=False, reason="redis unreachable")
        return JSONResponse(body.model_dump(), status_code=503)
    if not any(alive.values()):
        body = Readiness(status="not_ready", redis=True, workers_alive=alive, reason="no live worker")
        return JSONResponse(body.model_dump(), status_code=503)
    return Readiness(status="ready", redis=True, workers_alive=alive, warnings=await lane_warnings(services))


@router.get("/models", response_model=ModelsResponse, summary="Models, their defaults and where they run",
            responses={401: {"model": ErrorBody}, 503: {"model": ErrorBody}})
async def models(services: ServicesDep, _: AuthDep) -> ModelsResponse:
    q = services.queue
    workers: dict[str, list[dict[str, Any]]] = {}
    for w in await q.live_workers(services.registry.names):
        for name, where in w.models.items():
            info = {"id": w.id, "host": w.host, "device": where.get("device"), "running": w.running,
                    "lanes": where.get("lanes"), "adapters_loaded": where.get("adapters_loaded")}
            if where.get("parallel"):
                # A group's degree and its last call's time in collectives per denoising step.
                info["parallel"] = where["parallel"]
            workers.setdefault(name, []).append(info)
    out = []
    for e in services.registry.entries():
        adapters = [adapter_out(a, problem) for a, problem in await services.adapters.listing(e)]
        out.append(ModelInfo(**e.public(), limits=e.limits_within(services.settings), workers_alive=await q.workers_alive(e.name),
                             queue_depth=await q.depth(e.name), running_jobs=await q.running(e.name),
                             workers=workers.get(e.name, []), adapters=adapters,
                             max_adapters=e.adapters.max_per_request if e.serves_adapters else 0))
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
