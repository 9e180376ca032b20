"""The answer to a connection beyond ``CLUSCA_MAX_CONNECTIONS``: the service's JSON error, not plain text.

uvicorn refuses such a connection itself, before the app or any middleware sees the request
(its ``limit_concurrency``, which counts idle keep-alive connections too, so the app could not
count them instead). It answers with an ASGI callable of its own, which each of its HTTP
protocol modules looks up by name when it refuses; :func:`install` puts the service's answer in
its place: 503 ``over_capacity`` in the usual error shape, with ``Retry-After``, closing the
connection as uvicorn's does. Installed where the app is built, so every server process has it.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from service import metrics
from service.api.errors import error_response

# uvicorn's HTTP protocol modules (the ones a release lacks are skipped).
PROTOCOL_MODULES = ("uvicorn.protocols.http.h11_impl", "uvicorn.protocols.http.httptools_impl",
                    "uvicorn.protocols.http.zttp_impl", "uvicorn.protocols.http.zttp_h2_impl")
RETRY_AFTER_S = 1


async def over_capacity(scope: dict[str, Any], receive: Callable, send: Callable) -> None:
    metrics.ERRORS.labels("over_capacity").inc()
    response = error_response(503, "over_capacity",
                              "this API process holds as many connections as it may (CLUSCA_MAX_CONNECTIONS); "
                              "retry shortly", headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})
    await response(scope, receive, send)


def install() -> int:
    """Replace uvicorn's plain-text refusal in every protocol module it has; returns how many."""
    replaced = 0
    for name in PROTOCOL_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a protocol whose optional dependency is not installed
            continue
        if hasattr(module, "service_unavailable"):
            module.service_unavailable = over_capacity
            replaced += 1
    return replaced
