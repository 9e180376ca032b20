"""``/redoc``, with a ReDoc bundle that loads nothing from another host.

fastapi-offline ships ReDoc's bundle, but the bundle itself puts Redocly's logo in the side
menu from a CDN. This page serves the same bundle with that address turned into an asset of
this API, so the docs pages make no request elsewhere (a network that blocks them included);
``/docs`` (Swagger UI) needs no such change, only its online validator turned off.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import HTMLResponse, Response

REDOC_URL = "/redoc"
REDOC_JS = "/redoc/redoc.standalone.js"
_BUNDLE = Path(fastapi_offline.__file__).parent / "static" / "redoc.standalone.js"
# Images the bundle would fetch from Redocly's CDN (its logo).
_CDN_IMAGE = re.compile(rb"https://cdn\.redoc\.ly/[A-Za-z0-9_./-]+\.(?:svg|png)")
# Swagger UI's "valid" badge would ask validator.swagger.io about the schema.
SWAGGER_UI_PARAMETERS = {"validatorUrl": None}


@lru_cache(maxsize=1)
def local_redoc_bundle(favicon: str) -> bytes:
    """ReDoc's bundle with every CDN image it shows replaced by ``favicon`` (a path on this API)."""
    return _CDN_IMAGE.sub(favicon.encode(), _BUNDLE.read_bytes())


def install_redoc(app: FastAPI, static_url: str) -> None:
    """Serve ``/redoc`` and its bundle; build the app with ``redoc_url=None`` so this is the only one."""

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc_page(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{root}{REDOC_JS}", redoc_favicon_url=f"{root}{static_url}/favicon.png",
                              with_google_fonts=False)

    @app.get(REDOC_JS, include_in_schema=False)
    async def redoc_bundle(request: Request) -> Response:
        favicon = f"{request.scope.get('root_path', '')}{static_url}/favicon.png"
        return Response(local_redoc_bundle(favicon), media_type="text/javascript",
                        headers={"Cache-Control": "public, max-age=86400"})
