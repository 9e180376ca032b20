"""What the benchmarks that start the service share: waiting for it to be ready, stopping it."""

from __future__ import annotations

import time
from typing import Callable

import httpx


def wait_until_ready(url: str, timeout_s: float, *, poll_s: float, request_timeout_s: float,
               exited: Callable[[], str | None] = lambda: None) -> bool:
    """Poll ``url``/readyz until it answers 200 (True) or ``timeout_s`` passes (False).

    ``exited`` names why the service can no longer become ready (its process ended), or
    ``None``; a reason stops the wait with a RuntimeError carrying it.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reason = exited()
        if reason:
            raise RuntimeError(reason)
        try:
            if httpx.get(url + "/readyz", timeout=request_timeout_s).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    return False


def stop_all(procs: list, redis) -> None:
    """Stop the service's processes (all asked at once, then waited for), then its Redis."""
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(30)
    redis.stop()
