"""/docs and /redoc work offline: every asset they load comes from the API itself."""

from __future__ import annotations

import re

import pytest


@pytest.mark.parametrize("page,expect", [("/docs", "SwaggerUIBundle"), ("/redoc", "<redoc")])
def test_api_docs_load_only_local_assets(service, page, expect):
    with service.client() as c:
        r = c.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        html = r.text
        assert expect in html
        urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
        urls += re.findall(r"""url:\s*['"]([^'"]+)['"]""", html)
        assert urls, html
        # Nothing from another host (a CDN, web fonts): every asset is a path on this API.
        assert not [u for u in urls if re.match(r"^(https?:)?//", u)], urls
        assert not re.search(r"https?://(?!127\.0\.0\.1)", "".join(re.findall(r"<(?:script|link)[^>]*>", html)))
        for url in urls:
            asset = c.get(url)
            assert asset.status_code == 200, url
            assert len(asset.content) > 100, url
        scripts = [u for u in urls if u.endswith(".js")]
        assert scripts and all(len(c.get(u).content) > 100_000 for u in scripts)  # the real bundles, not stubs
        assert c.get("/openapi.json").status_code == 200


def test_docs_pages_and_assets_are_counted_under_their_routes(service):
    with service.client() as c:
        html = c.get("/docs").text
        asset = re.findall(r"""src\s*=\s*["'](/docs-assets/[^"']+)["']""", html)[0]
        assert c.get(asset).status_code == 200
        assert c.get("/redoc").status_code == 200
        text = c.get("/metrics").text
    for endpoint in ("/docs-assets", "/docs", "/redoc"):
        assert re.search(rf'^clusca_requests_total\{{endpoint="{endpoint}",status="200"\}} [1-9]', text, re.M), endpoint
    assert not re.search(r'^clusca_requests_total\{endpoint="unmatched",status="200"\}', text, re.M)
