"""ASGI middleware: body size limit and request counting (plain ASGI, no per-request task)."""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

from starlette.routing import Match

from .. import metrics

Scope = dict[str, Any]


class BodyLimitAndMetrics:
    """Refuse bodies over ``max_body_bytes`` with 413 and count requests by route and status.

    The body is read here before the app sees it, so an oversized upload is stopped
    after ``max_body_bytes`` whatever its Content-Length says.
    """

    def __init__(self, app: Callable, max_body_bytes: int, routes: Sequence[Any] = ()):
        self.app = app
        self.limit = max_body_bytes
        # The app's routes, to name the endpoint of requests answered here, before routing.
        self.routes = routes

    def _template(self, scope: Scope) -> str | None:
        partial = None
        for route in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return getattr(route, "path", None)
            if match == Match.PARTIAL and partial is None:
                partial = getattr(route, "path", None)
        return partial

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}
        # As it came in: a mount the request is routed through rewrites the scope's root_path.
        arrived = dict(scope)

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read(scope, receive)
                if body is None:
                    await self._too_large(send_wrapper)
                    return
                sent = False

                async def replay() -> dict:
                    nonlocal sent
                    if not sent:
                        sent = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                await self.app(scope, replay, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or self._template(arrived) or "unmatched"
            metrics.REQUESTS.labels(endpoint, str(status["code"])).inc()

    async def _read(self, scope: Scope, receive: Callable) -> bytes | None:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    if int(value) > self.limit:
                        return None
                except ValueError:
                    pass
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _too_large(self, send: Callable) -> None:
        metrics.ERRORS.labels("body_too_large").inc()
        body = json.dumps({"error": {"code": "body_too_large", "param": "body",
                                     "message": f"the request body exceeds {self.limit} bytes"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
