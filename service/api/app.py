"""The FastAPI application factory."""

from __future__ import annotations

import logging
import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline

from service import metrics
from service.broker import reconcile, connect as redis_conn
from service.broker.ack_log import AckLog
from service.broker.keys import check_layout_async
from service.broker.producer import JobQueue
from service.registry import Registry
from service.settings import Settings, get_settings
from service.api import errors, overload
from service.api.deps import Services
from service.api.middleware import BodyLimitAndMetrics
from service.api.openapi_links import add_links
from service.api.routers import admin, generate, jobs, openai, openai_models, playground, system, videos
from service.api.docs_pages import SWAGGER_UI_PARAMETERS, install_redoc
from service.api.form_body import FormAsJson

log = logging.getLogger("clusca.api")
DOCS_ASSETS = "/docs-assets"


def create_app(settings: Settings | None = None, registry: Registry | None = None) -> FastAPI:
    """Build the API. Settings default to the environment; Redis is connected lazily per call."""
    settings = settings or get_settings()
    if not settings.redis_url:
        raise RuntimeError("REDIS_URL is not set (clusca serve starts a private Redis; clusca api needs one)")
    redis_conn.parse(settings.redis_url)  # a malformed URL stops the start, naming what is wrong
    registry = registry or Registry.load(settings.models_file)
    if settings.default_model not in registry:
        raise RuntimeError(f"CLUSCA_DEFAULT_MODEL {settings.default_model!r} is not in the registry "
                           f"({', '.join(registry.names)})")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Short timeouts: a dead or hung Redis must turn into a quick 503, never a hanging request.
        r = redis_conn.async_client(settings.redis_url, socket_connect_timeout=2, socket_timeout=5,
                                    health_check_interval=10, retry_on_timeout=False)
        try:
            await check_layout_async(r, registry.names)
        except redis_conn.UNAVAILABLE as exc:  # the API starts without Redis and answers 503 until it is back
            log.warning("Redis unreachable at start (%s); the queue layout is checked by the workers", exc)
        disk = AckLog(settings.reconcile_journal, settings.redis_url) if settings.reconcile_journal else None
        journal = reconcile.AckJournal(settings.reconcile_settle_s, disk=disk, max_age_s=settings.result_ttl_s)
        for name in registry.names:  # a zero per model, so alerts and dashboards see the series before any loss
            metrics.JOBS_LOST.labels(name)
            if registry.get(name).serves_adapters:
                metrics.ADAPTER_REQUESTS.labels(name, "other")
        queue = JobQueue(r, max_queue=settings.max_queue, ttl_s=settings.result_ttl_s,
                         wait_replicas=settings.redis_wait_replicas, wait_timeout_ms=settings.redis_wait_timeout_ms,
                         journal=journal)
        app.state.services = Services(settings, registry, r, queue, journal)
        checker = asyncio.create_task(reconcile.run(journal, r))
        log.info("API ready; models: %s", ", ".join(registry.names))
        try:
            yield
        finally:
            checker.cancel()
            journal.close()
            await queue.close()
            await r.aclose()

    # /docs and /redoc with their Swagger UI and ReDoc assets served from the installed
    # fastapi-offline package: they work without any network access.
    app = FastAPIOffline(title="ClusCa Serve", version="0.1.0", lifespan=lifespan, static_url=DOCS_ASSETS,
                         description="Text-to-image generation with diffusion transformers, accelerated by ClusCa.",
                         redoc_url=None, swagger_ui_parameters=SWAGGER_UI_PARAMETERS)
    install_redoc(app, DOCS_ASSETS)  # fastapi-offline's ReDoc bundle still shows a logo from a CDN
    app.dependency_overrides[get_settings] = lambda: settings
    errors.install(app)
    overload.install()
    routers = (admin.router, generate.router, jobs.router, openai.router, videos.router, system.router, playground.router,
               openai_models.router)
    for r in routers:
        app.include_router(r)
    # The routes themselves (full paths), so requests refused before routing are counted by endpoint;
    # with the app's own (the docs pages and their assets' mount), which no router holds.
    own = [route for route in app.routes if getattr(route, "path", None)]
    # OpenAI's SDK sends videos.create as a multipart form; the route reads the same fields as JSON.
    app.add_middleware(FormAsJson, paths=["/v1/videos"])
    app.add_middleware(BodyLimitAndMetrics, max_body_bytes=settings.max_body_bytes,
                       routes=own + [route for r in routers for route in r.routes],
                       body_timeout_s=settings.body_timeout_s,
                       streamed=lambda path: admin.ADAPTER_UPLOAD.match(path) is not None)
    install_openapi(app, settings, registry)
    return app


def install_openapi(app: FastAPI, settings: Settings, registry: Registry | None = None) -> None:
    """Make the published schema say what this deployment really accepts.

    The pydantic models carry static outer bounds; the configured limits, the models'
    own (the widest of them: a schema cannot tie a bound to the ``model`` field; the API
    checks each model's and ``GET /models`` lists them) and whether keys are needed at
    all are only known at start-up, so they are written in here.
    """
    models = [e.limits_within(settings) for e in (registry.entries() if registry else [])]
    side = max((m.max_side for m in models), default=settings.max_side)
    steps = max((m.max_steps for m in models), default=settings.max_steps)
    images = max((m.max_images for m in models), default=settings.max_images)
    frames = max((m.max_frames for m in models if m.max_frames is not None), default=settings.max_frames)
    limits = {"prompt": ("maxLength", settings.max_prompt_chars),
              "negative_prompt": ("maxLength", settings.max_prompt_chars),
              "width": ("maximum", side), "height": ("maximum", side),
              "steps": ("maximum", steps), "num_images": ("maximum", images), "n": ("maximum", images),
              "num_frames": ("maximum", frames)}

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for name in ("GenerateRequest", "OpenAIImageRequest", "OpenAIVideoRequest"):
            props = schema.get("components", {}).get("schemas", {}).get(name, {}).get("properties", {})
            for field, (keyword, value) in limits.items():
                if field in props:
                    _set_limit(props[field], keyword, value)
        if not settings.api_keys:
            schema.get("components", {}).pop("securitySchemes", None)
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    if isinstance(op, dict):
                        op.pop("security", None)
                        op.get("responses", {}).pop("401", None)
        add_links(schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _set_limit(prop: dict, keyword: str, value: int) -> None:
    # Optional fields are `anyOf: [{type: ...}, {type: null}]`; the bound goes on the non-null branch.
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") in ("string", "integer"):
            branch[keyword] = min(value, branch.get(keyword, value))
