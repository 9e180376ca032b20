"""The service's pages in a real browser (headless Chromium) on a network with nothing beyond the
loopback: the playground (``/``), Swagger UI (``/docs``) and ReDoc (``/redoc``) render, and none
of them asks another host for anything (a CDN logo, web fonts, a schema validator)."""

from __future__ import annotations

import contextlib
import os
from urllib.parse import urlsplit

import pytest

CHROMIUM = "/usr/bin/chromium"
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}

pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                reason=f"no browser at {CHROMIUM} (Debian's chromium package)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (it is in the test extra)")


def _outside(url: str) -> bool:
    if url.startswith(("data:", "blob:", "about:")):
        return False
    return urlsplit(url).hostname not in LOOPBACK


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            yield b
        finally:
            b.close()


@contextlib.contextmanager
def _offline_page(browser):
    """A page whose requests to any host but the loopback are aborted, and recorded in ``.outside``."""
    context = browser.new_context()
    pg = context.new_page()
    pg.outside, pg.errors = [], []
    pg.on("request", lambda r: _outside(r.url) and pg.outside.append(r.url))
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    context.route("**/*", lambda route: route.abort() if _outside(route.request.url) else route.continue_())
    pg.set_default_timeout(60_000)
    try:
        yield pg
    finally:
        context.close()


def test_redoc_renders_with_its_logo_from_this_api_and_nothing_from_elsewhere(service, browser):
    with _offline_page(browser) as pg:
        pg.goto(service.base_url + "/redoc", wait_until="networkidle")
        pg.wait_for_selector("text=OpenAI-compatible generation", state="attached")
        assert pg.outside == [], pg.outside
        logo = pg.locator('img[alt="redocly logo"]')
        logo.wait_for(state="visible")
        assert urlsplit(logo.get_attribute("src")).hostname in (None, *LOOPBACK)
        assert pg.evaluate("() => document.querySelector('img[alt=\"redocly logo\"]').naturalWidth") > 0
        assert pg.outside == [] and pg.errors == [], (pg.outside, pg.errors)


def test_swagger_ui_renders_the_api_and_asks_no_other_host(service, browser):
    with _offline_page(browser) as pg:
        pg.goto(service.base_url + "/docs", wait_until="networkidle")
        pg.wait_for_selector('.opblock-summary-path[data-path="/v1/videos"]', state="attached")
        assert pg.locator(".opblock").count() > 10
        assert pg.outside == [] and pg.errors == [], (pg.outside, pg.errors)


def test_the_playground_page_asks_no_other_host(service, browser):
    with _offline_page(browser) as pg:
        pg.goto(service.base_url + "/", wait_until="networkidle")
        pg.wait_for_selector("button", state="visible")
        assert pg.outside == [] and pg.errors == [], (pg.outside, pg.errors)
