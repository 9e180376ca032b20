"""The playground page at ``/``: served by the API itself, every asset local, nothing from another host.

These run the app in-process (no request here reaches Redis); the browser test with a real
service is tests/api/test_playground_browser.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.api.routers.playground import ASSETS
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "service" / "api" / "static"
TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript"}
# An absolute URL in any form a browser would follow: scheme-qualified or protocol-relative.
ABSOLUTE = re.compile(r"""(?:https?:)?//[\w.-]+\.\w|["'(]\s*(?:https?:)?//""", re.I)


def _client(**env: str) -> TestClient:
    return TestClient(create_app(Settings.from_env({"REDIS_URL": "redis://127.0.0.1:1/0", **env})))


def _references(text: str, kind: str) -> list[str]:
    """The URLs a file makes the browser load: tags in HTML, imports in JS, url() in CSS."""
    if kind == ".html":
        return re.findall(r"""<(?:script|link|img|iframe|source)\b[^>]*?\b(?:src|href)\s*=\s*["']([^"']*)["']""", text)
    if kind == ".js":
        return re.findall(r"""\b(?:import|from)\s*\(?\s*["']([^"']+)["']""", text)
    return re.findall(r"""url\(\s*["']?([^"')]+)""", text)


def _crawl(client: TestClient) -> dict[str, tuple[str, str]]:
    """Every path reachable from ``/``, with its content type and body."""
    seen: dict[str, tuple[str, str]] = {}
    todo = ["/"]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        r = client.get(path)
        assert r.status_code == 200, (path, r.text)
        seen[path] = (r.headers["content-type"], r.text)
        kind = ".html" if path == "/" else Path(path).suffix
        for ref in _references(r.text, kind):
            if ref.startswith("data:"):
                continue
            assert ref.startswith(("/", "./")), f"{path} references {ref!r}, not a path on this API"
            todo.append(ref if ref.startswith("/") else str(Path(path).parent / ref[2:]))
    return seen


def test_page_and_assets_are_served_locally_with_their_types():
    with _client() as c:
        served = _crawl(c)
    # The page pulls in every shipped file, each with the type its extension calls for.
    assert set(served) == {"/"} | {f"/playground/{n}" for n in ASSETS}
    for path, (ctype, body) in served.items():
        kind = ".html" if path == "/" else Path(path).suffix
        assert ctype.startswith(TYPES[kind]) and "charset=utf-8" in ctype, (path, ctype)
        assert not ABSOLUTE.search(body), (path, ABSOLUTE.search(body))
    assert 'id="generate"' in served["/"][1] and "/generate" in served["/playground/client.js"][1]


def test_shipped_files_are_exactly_the_served_ones():
    # A file added to static/ but not to the router's list would be missing in the browser.
    assert {p.name for p in STATIC.iterdir() if p.is_file()} == {"index.html", *ASSETS}


def test_the_browser_is_told_to_reach_no_other_host():
    with _client() as c:
        r = c.get("/")
    policy = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'"
    for directive in ("script-src", "style-src", "connect-src"):
        assert policy[directive] == "'self'", directive
    assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", ["/playground/nope.js", "/playground/index.html.bak", "/playground/..%2Fapp.py",
                                  "/playground/%2E%2E%2Frouters%2Fplayground.py", "/playground/"])
def test_unknown_assets_are_404_in_the_error_shape(path):
    with _client() as c:
        r = c.get(path)
    assert r.status_code == 404
    assert r.json()["error"]["message"]
    assert "import" not in r.text


def test_the_page_loads_without_a_key_and_the_api_still_needs_one():
    with _client(CLUSCA_API_KEYS="secret") as c:
        assert c.get("/").status_code == 200
        assert c.get("/playground/playground.js").status_code == 200
        assert c.get("/models").status_code == 401
    js = (STATIC / "client.js").read_text()
    assert "Authorization: `Bearer ${apiKey}`" in js


def test_the_page_is_not_part_of_the_api_schema_and_calls_only_its_paths():
    with _client() as c:
        paths = c.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not [p for p in paths if p.startswith("/playground")]
    # The endpoints the scripts name literally (the job's own links come from its answers).
    named = set()
    for name in ASSETS:
        if name.endswith(".js"):
            named |= set(re.findall(r"""["'`](/[a-z][\w/{}-]*)["'`]""", (STATIC / name).read_text()))
    assert named and named <= set(paths), named - set(paths)
