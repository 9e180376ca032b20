"""ASGI middleware: body size and read-time limits and request counting (plain ASGI, no per-request task)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable, Sequence

from starlette.routing import Match

from service import metrics

Scope = dict[str, Any]


def replay(body: bytes, receive: Callable) -> Callable:
    """A ``receive`` for the app that hands it ``body``, read whole here, as one message, and then
    passes on whatever the server sends next (a disconnect)."""
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class BodyLimitAndMetrics:
    """Refuse bodies over ``max_body_bytes`` with 413, and bodies not all sent within
    ``body_timeout_s`` with 408; count requests by route and status.

    The body is read here before the app sees it, so an oversized upload is stopped
    after ``max_body_bytes`` whatever its Content-Length says, and a client that announces
    more than it sends (or sends it a byte at a time) holds its connection no longer than
    ``body_timeout_s``.
    """

    def __init__(self, app: Callable, max_body_bytes: int, routes: Sequence[Any] = (),
                 body_timeout_s: float | None = None, streamed: Callable[[str], bool] | None = None):
        self.app = app
        # Paths whose route reads the body itself, after checking the caller (adapter uploads: larger
        # than any request body, capped by the route); their requests are counted here all the same.
        self.streamed = streamed or (lambda _path: False)
        self.limit = max_body_bytes
        self.body_timeout_s = body_timeout_s
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
            if scope["method"] in ("POST", "PUT", "PATCH") and not self.streamed(scope.get("path", "")):
                try:
                    body = await _within(self.body_timeout_s, self._read(scope, receive))
                except asyncio.TimeoutError:
                    await self._too_slow(send_wrapper)
                    return
                if body is None:
                    await self._too_large(send_wrapper)
                    return
                await self.app(scope, replay(body, receive), send_wrapper)
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

    async def _too_slow(self, send: Callable) -> None:
        metrics.ERRORS.labels("body_timeout").inc()
        await _send_error(send, 408, "body_timeout", f"the request body was not received within "
                          f"{self.body_timeout_s:g} s (CLUSCA_BODY_TIMEOUT_S); send all the bytes "
                          f"Content-Length announces")


async def _within(seconds: float | None, reading: Any) -> Any:
    """Await ``reading``, raising ``asyncio.TimeoutError`` after ``seconds`` (None: no limit)."""
    if seconds is None:
        return await reading
    if hasattr(asyncio, "timeout"):  # Python 3.11+: a deadline on this task, no new task per request
        async with asyncio.timeout(seconds):
            return await reading
    return await asyncio.wait_for(reading, seconds)


async def _send_error(send: Callable, status: int, code: str, message: str) -> None:
    """The service's error shape (service/api/errors.py), closing the connection: the rest of the
    request was never read."""
    body = json.dumps({"error": {"code": code, "message": message, "param": "body"}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
