"""One error shape for every failure, and the handlers that produce it.

Clients always get ``{"error": {"code", "message", "param", ...}}`` (the shape OpenAI
SDKs already understand) and never a stack trace; unexpected exceptions are logged
here and answered with a bare 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from clusca.config import PRESETS

from service import metrics
from service.api.schemas import CACHE_FIELDS
from service.broker.connect import UNAVAILABLE, is_transport_failure
from service.broker.wire import NotReplicated

log = logging.getLogger("clusca.api")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers
        self.extra = extra


def error_response(status: int, code: str, message: str, *, param: str | None = None,
                   headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message, "param": param}
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _field_name(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


# Pydantic's error types for "an object was expected here".
_NOT_AN_OBJECT = {"model_attributes_type", "model_type", "dict_type"}
_PRESETS = tuple(PRESETS)


def _message(err: dict[str, Any], content_type: str = "application/json") -> str:
    loc = tuple(err.get("loc", ()))
    if err.get("type") in _NOT_AN_OBJECT and loc == ("body",):
        if "json" not in content_type.lower():
            return (f"the body must be JSON, sent with Content-Type: application/json "
                    f"(this request has {content_type or 'no Content-Type'!s})")
        return "the body must be a JSON object"
    if err.get("type") in _NOT_AN_OBJECT and loc == ("body", "cache"):
        given = err.get("input")
        if isinstance(given, str) and given in _PRESETS:
            return f'must be an object; for the {given!r} preset send {{"preset": "{given}"}}'
        return 'must be an object of ClusCa settings, for example {"preset": "balanced"}'
    if err.get("type") == "missing":
        return "is required"
    if err.get("type") == "extra_forbidden":
        if loc[:2] == ("body", "cache") and len(loc) == 3:
            if loc[2] == "modules":
                return "module patterns are set by the operator, not per request"
            return f"unknown setting; known settings are {CACHE_FIELDS}"
        return "is not a known field"
    if err.get("type") == "finite_number":
        return "must be a finite number (NaN and infinity are not allowed)"
    return str(err.get("msg", "is invalid"))


def malformed_body(reason: str) -> JSONResponse:
    """The one answer to a body that is not JSON: a 422 naming ``body``."""
    message = f"the body is not valid JSON ({reason})"
    return error_response(422, "validation_error", f"body: {message}", param="body",
                          fields=[{"field": "body", "message": message}])


def _parse_failure(cause: BaseException | None) -> str:
    if isinstance(cause, UnicodeError):
        return "it is not UTF-8 text"
    if isinstance(cause, RecursionError):
        return "nested too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "a number has too many digits"
    return "it could not be parsed"


def error_kind(code: str) -> str:
    """The ``clusca_errors_total`` kind of an error code: every refused value is ``validation``,
    whichever check refused it."""
    return "validation" if code == "validation_error" else code


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        metrics.ERRORS.labels(error_kind(exc.code)).inc()
        return error_response(exc.status, exc.code, exc.message, param=exc.param, headers=exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.ERRORS.labels("validation").inc()
        content_type = request.headers.get("content-type", "")
        invalid = next((e for e in exc.errors() if e.get("type") == "json_invalid"), None)
        if invalid is not None:
            return malformed_body(str(invalid.get("ctx", {}).get("error", "decode error")))
        fields = []
        for err in exc.errors()[:20]:
            loc = tuple(err.get("loc", ()))
            fields.append({"field": _field_name(loc), "message": _message(err, content_type)})
        summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
        return error_response(422, "validation_error", summary, param=fields[0]["field"] if fields else None,
                              fields=fields)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}.get(exc.status_code, "http_error")
        msg = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 400 and "parsing the body" in msg:
            # The framework answers a 400 when the JSON parser fails with anything but a syntax
            # error (bytes that are not UTF-8, nesting too deep, a number too long); these are
            # malformed JSON like any other and get the same 422 as a syntax error.
            metrics.ERRORS.labels("validation").inc()
            return malformed_body(_parse_failure(exc.__cause__))
        return error_response(exc.status_code, code, msg, headers=getattr(exc, "headers", None))

    async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
        metrics.ERRORS.labels("redis_unavailable").inc()
        log.warning("redis unavailable: %s", exc)
        return error_response(503, "unavailable", "the job queue is unavailable; retry shortly",
                              headers={"Retry-After": "5"})

    # Every way each Redis mode says "no primary right now" (a failover in progress included).
    for kind in UNAVAILABLE:
        app.add_exception_handler(kind, _redis_down)

    # The asyncio cluster client can close a connection under a command while it re-reads the slot
    # map after a failover; what escapes then is no redis error, but it means the same. Handled
    # here (not by the catch-all below) so the client's connection stays open.
    async def _maybe_redis_down(request: Request, exc: Exception) -> JSONResponse:
        if is_transport_failure(exc):
            return await _redis_down(request, exc)
        return await _unexpected(request, exc)

    for kind in (RuntimeError, AttributeError):
        app.add_exception_handler(kind, _maybe_redis_down)

    @app.exception_handler(NotReplicated)
    async def _not_replicated(_: Request, exc: NotReplicated) -> JSONResponse:
        metrics.ERRORS.labels("not_replicated").inc()
        log.warning("%s", exc)
        return error_response(503, "not_replicated", "the job could not be confirmed on a replica in time; retry "
                              "with the same Idempotency-Key to get the same job", headers={"Retry-After": "2"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        metrics.ERRORS.labels("internal").inc()
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error")
