"""The browser playground: one page at ``/`` and its assets, shipped with the package.

The page talks to the public API only (``/models``, ``/generate``, ``/jobs/...``) with
the same requests any client makes. Its files are a fixed list read from the package,
so no request path ever reaches the filesystem, and a Content-Security-Policy keeps the
page from loading or sending anything to another host.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from service.api.errors import ApiError

router = APIRouter(include_in_schema=False)

STATIC = Path(__file__).resolve().parents[1] / "static"
ASSETS = {
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "client.js": "text/javascript; charset=utf-8",
    "compare.js": "text/javascript; charset=utf-8",
    "adapters.js": "text/javascript; charset=utf-8",
    "history.js": "text/javascript; charset=utf-8",
    "edit.js": "text/javascript; charset=utf-8",
}
# 'self' only: job images arrive as blob: URLs, the history keeps them as data: URLs.
POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
          "media-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
          "frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": POLICY, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


@lru_cache(maxsize=None)
def _read(name: str) -> bytes:
    return (STATIC / name).read_bytes()


@router.get("/")
async def page() -> Response:
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/playground/{name}")
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise ApiError(404, "not_found", f"no playground asset {name!r}", param="name")
    return Response(_read(name), media_type=ASSETS[name], headers=HEADERS)
