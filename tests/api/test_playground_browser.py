"""The playground in a real browser (headless Chromium) against ``clusca serve`` with the built-in model.

A user's path through the page: type a prompt, Generate, watch the per-step progress and
the image; compare mode with timings, FLOPs speedup and PSNR; an API error shown as the
API words it; the tab's history. Every request the page makes must go to the service.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from clusca import quality

from tests.support import clusca_serve, models_yaml, noop_model

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = "/tmp/clusca-playground.png"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                                    reason=f"no browser at {CHROMIUM} (Debian's chromium package)")]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (it is in the test extra)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with clusca_serve(tmp_path_factory.mktemp("playground"), {"CLUSCA_LOG_LEVEL": "WARNING"}, timeout=180) as s:
        yield s


@contextlib.contextmanager
def _browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            pg = browser.new_page()
            pg.requests = []
            pg.on("request", lambda r: pg.requests.append(r.url))
            pg.console_errors = []
            # A 4xx answer the page shows on purpose is logged by the browser too; that is not a fault.
            pg.on("console", lambda m: m.type == "error" and not m.text.startswith("Failed to load resource")
                  and pg.console_errors.append(m.text))
            pg.on("pageerror", lambda e: pg.console_errors.append(str(e)))
            pg.set_default_timeout(60_000)
            # Predicates are functions, not strings: the page's policy forbids eval, and the test keeps it on.
            yield pg
        finally:
            browser.close()


@pytest.fixture
def page(served):
    with _browser() as pg:
        yield pg


def _only_the_service(pg, served) -> None:
    origin = urlsplit(served.url)
    elsewhere = [u for u in pg.requests
                 if not u.startswith(("data:", "blob:")) and urlsplit(u).netloc != origin.netloc]
    assert pg.requests and not elsewhere, elsewhere


def _as_js(value) -> str:
    """A JSON value as JavaScript's String() writes it (0.0 is "0", True is "true")."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_generate_shows_progress_then_the_image(page, served):
    page.goto(served.url + "/")
    # The built-in model's own defaults, as the service publishes them (they follow its checkpoint).
    defaults = next(m for m in httpx.get(served.url + "/models").json()["models"] if m["name"] == "shapes")["defaults"]
    page.wait_for_selector("#model option[value=shapes]", state="attached")
    assert page.inner_text("#preset option[value='']") == f"default ({defaults['cache']})"
    tuned = defaults["cache_presets"].get(defaults["cache"])
    info = page.inner_text("#preset-info")
    assert info.startswith(f"{defaults['cache']} as tuned for shapes" if tuned else defaults["cache"]), info
    for knob, value in (tuned or {}).items():
        assert f"{knob} {_as_js(value)}" in info, (knob, info)
    page.fill("#prompt", "a blue square at the top")
    page.fill("#seed", "7")
    page.click("#generate")

    image = page.wait_for_selector(".panel img")
    page.wait_for_function("() => document.querySelector('.panel img').naturalWidth > 0")
    status = page.inner_text(".panel .status")
    steps = int(re.search(r"done, (\d+) steps", status).group(1))
    events = int(re.search(r"(\d+) progress event", status).group(1))
    assert steps == defaults["steps"] and events == steps, status
    assert page.eval_on_selector(".panel progress", "p => [p.value, p.max]") == [steps, steps]
    assert image.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [defaults["width"], defaults["height"]]
    assert page.inner_text("[data-stat=seed]") == "7"
    assert float(page.inner_text("[data-stat='FLOPs speedup']").rstrip("×")) > 1.0
    assert page.is_hidden("#error")
    assert page.locator("#history li").count() == 1
    _only_the_service(page, served)
    assert not page.console_errors, page.console_errors


def test_compare_mode_runs_uncached_and_cached_side_by_side(page, served):
    page.goto(served.url + "/")
    page.wait_for_selector("#model option[value=shapes]", state="attached")
    page.fill("#prompt", "a red circle on the left")
    page.fill("#seed", "11")
    page.select_option("#preset", "fast")
    page.check("#compare")
    page.click("#generate")

    page.wait_for_selector("#summary:not([hidden])", timeout=120_000)
    assert page.locator(".panel img").count() == 2
    assert page.locator(".panel.diff canvas").count() == 1
    titles = page.locator(".panel h3").all_inner_texts()
    assert titles[:2] == ["uncached", "fast"], titles
    cache_cells = page.locator("[data-stat=cache]").all_inner_texts()
    assert cache_cells[0] == "off" and cache_cells[1].startswith("clusca"), cache_cells
    seeds = page.locator("[data-stat=seed]").all_inner_texts()
    assert seeds == ["11", "11"]
    psnr = page.inner_text("#summary-psnr")
    assert re.fullmatch(r"\d+\.\d\d dB", psnr), psnr
    assert 10 < float(psnr.split()[0]) < 100  # close to uncached, and not the same image
    # The page's number is the library's, from the same two images.
    shown = [u for u in page.requests if re.search(r"/jobs/[0-9a-f]{32}/images/0$", u)]
    assert len(shown) == 2, shown
    pair = [np.asarray(Image.open(io.BytesIO(httpx.get(u).content)).convert("RGB"), dtype=np.float64) / 255
            for u in shown]
    assert float(psnr.split()[0]) == pytest.approx(quality.psnr(*pair), abs=0.006)
    wall = page.inner_text("#summary-speedup")
    assert re.search(r"\d\.\d{3} s → \d\.\d{3} s \(\d+\.\d\d× (faster|slower)\)", wall), wall
    flops = float(page.inner_text("#summary-flops").rstrip("×"))
    assert flops > 1.5, flops
    page.screenshot(path=SCREENSHOT, full_page=True)

    # A value the API refuses: its own words, naming the field, and no job.
    page.uncheck("#compare")
    page.fill("[data-knob=interval]", "0")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    error = page.inner_text("#error")
    assert error.startswith("422 validation_error") and "cache.interval" in error, error
    assert page.locator(".panel").count() == 0

    # The history survives a reload of the tab, and picking an entry brings its settings back.
    page.reload()
    page.wait_for_selector("#model option[value=shapes]", state="attached")
    assert page.locator("#history li").count() == 1
    page.fill("#prompt", "")
    page.click("#history li")
    assert page.input_value("#prompt") == "a red circle on the left"
    assert page.input_value("#preset") == "fast" and page.input_value("#seed") == "11"
    _only_the_service(page, served)
    assert not page.console_errors, page.console_errors


def test_an_uploaded_image_inpainted_where_the_mask_is_painted(page, served, tmp_path):
    src = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    upload = tmp_path / "in.png"
    Image.fromarray(src).save(upload)
    page.goto(served.url + "/")
    page.wait_for_selector("#model option[value=shapes]", state="attached")
    page.click("#edit summary")
    page.set_input_files("#edit-file", str(upload))
    page.wait_for_function("() => document.querySelector('#edit-image').width === 32")
    assert "32×32" in page.inner_text("#edit-info")
    # Paint a stroke down the left quarter of the image.
    box = page.locator("#edit-mask").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.12, box["y"] + box["height"] * 0.1)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.12, box["y"] + box["height"] * 0.9, steps=12)
    page.mouse.up()
    assert "painted pixels are redrawn" in page.inner_text("#edit-info")
    page.fill("#prompt", "a blue square on the left")
    page.fill("#seed", "5")
    page.click("#generate")
    page.wait_for_function("() => document.querySelector('.panel img')?.naturalWidth === 32")
    assert page.inner_text("[data-stat=edit]") == "strength 1, masked"
    sent = page.text_content(".panel .request pre")
    assert "<image: " in sent and "<mask: " in sent and "base64" not in sent
    shown = [u for u in page.requests if re.search(r"/jobs/[0-9a-f]{32}/images/0$", u)]
    out = np.asarray(Image.open(io.BytesIO(httpx.get(shown[-1]).content)).convert("RGB"))
    assert np.array_equal(out[:, 16:], src[:, 16:])  # the right half was never painted: kept exactly
    assert not np.array_equal(out[:, :8], src[:, :8])  # the stroke was redrawn
    # The history keeps the settings, not the image and mask.
    page.reload()
    page.wait_for_selector("#history li")
    request = json.loads(page.evaluate("() => sessionStorage.getItem('clusca-playground-history')"))[0]["request"]
    assert request["prompt"] == "a blue square on the left" and not {"image", "mask"} & set(request)
    _only_the_service(page, served)
    assert not page.console_errors, page.console_errors


def test_a_generated_image_is_reused_as_the_image_to_edit(page, served):
    page.goto(served.url + "/")
    page.wait_for_selector("#model option[value=shapes]", state="attached")
    page.fill("#prompt", "a red circle on the left")
    page.fill("#seed", "4")
    page.click("#generate")
    page.wait_for_function("() => document.querySelector('.panel img')?.naturalWidth === 32")
    page.click(".panel .reuse")
    page.wait_for_function("() => document.querySelector('#edit-image').width === 32")
    assert page.evaluate("() => document.querySelector('#edit').open")
    assert "32×32" in page.inner_text("#edit-info")
    page.fill("#prompt", "a blue square on the left")
    page.click("#generate")
    page.wait_for_function("() => document.querySelector('[data-stat=edit]')?.textContent.startsWith('strength')")
    assert "<image: " in page.text_content(".panel .request pre")
    _only_the_service(page, served)
    assert not page.console_errors, page.console_errors


NOOP_MODELS = models_yaml(noop_model("noop", 6), noop_model("slow", 50, delay=0.2))


def test_with_api_keys_the_page_asks_for_one_and_sends_it_and_cancel_stops_a_job(tmp_path):
    models = tmp_path / "models.yaml"
    models.write_text(NOOP_MODELS)
    env = {"CLUSCA_MODELS": str(models), "CLUSCA_DEFAULT_MODEL": "noop", "CLUSCA_API_KEYS": "playground-key",
           "CLUSCA_LOG_LEVEL": "WARNING"}
    with clusca_serve(tmp_path, env) as s, _browser() as pg:
        pg.goto(s.url + "/")
        pg.wait_for_selector("#error:not([hidden])")
        assert pg.inner_text("#error").startswith("401 unauthorized")
        assert pg.is_visible("#api-key") and pg.locator("#model option").count() == 0

        for key, status in (("not-the-key", 401), ("playground-key", 200)):
            pg.fill("#api-key", key)
            with pg.expect_response(lambda r: r.url.endswith("/models")) as answer:
                pg.locator("#api-key").dispatch_event("change")
            assert answer.value.status == status and answer.value.request.headers["authorization"] == f"Bearer {key}"
        pg.wait_for_selector("#model option[value=noop]", state="attached")
        assert pg.is_hidden("#error")
        assert pg.is_hidden("#edit")  # the no-op model edits nothing: the page offers no upload

        pg.fill("#prompt", "anything")
        pg.click("#generate")
        pg.wait_for_function("() => document.querySelector('.panel img')?.naturalWidth === 16")
        assert "6 progress event(s)" in pg.inner_text(".panel .status")

        # Cancel, through the API with the key, stops a running job at its next step.
        pg.select_option("#model", "slow")
        pg.click("#generate")
        pg.wait_for_function("() => /step \\d+ \\/ 50/.test(document.querySelector('.panel .status').textContent)")
        with pg.expect_response(lambda r: r.url.endswith("/cancel")) as answer:
            pg.click("#cancel")
        assert answer.value.status in (200, 202)
        pg.wait_for_selector("#error:not([hidden])")
        assert "cancelled" in pg.inner_text("#error") and "cancelled" in pg.inner_text(".panel .status")
        assert pg.eval_on_selector(".panel progress", "p => p.value") < 50
        assert pg.is_enabled("#generate") and pg.is_disabled("#cancel")
        _only_the_service(pg, s)
        assert not pg.console_errors, pg.console_errors


@pytest.fixture(scope="module")
def served_with_adapters(tmp_path_factory):
    from clusca_shapes import WEIGHTS_DIR, ShapesFluxPipeline
    from tests.support import linear_shapes, write_lora

    root = tmp_path_factory.mktemp("playground-adapters")
    layers = linear_shapes(ShapesFluxPipeline.from_pretrained(WEIGHTS_DIR).transformer)
    write_lora(root / "store" / "shapes" / "ink.safetensors", layers, seed=1, scale=1.0)
    write_lora(root / "store" / "shapes" / "chalk.safetensors", layers, seed=2, scale=1.0)
    (root / "serve").mkdir()
    with clusca_serve(root / "serve", {"CLUSCA_LOG_LEVEL": "WARNING", "CLUSCA_ADAPTERS_DIR": str(root / "store")},
                      timeout=180) as s:
        yield s


def test_the_adapter_picker_sends_the_picked_adapters_and_the_panel_shows_them(served_with_adapters):
    served = served_with_adapters
    with _browser() as page:
        page.goto(served.url + "/")
        page.wait_for_selector("#model option[value=shapes]", state="attached")
        page.click("#adapters summary")
        page.wait_for_selector("#adapter-list input[data-name=ink]")
        assert sorted(page.eval_on_selector_all("#adapter-list input[type=checkbox]",
                                                "els => els.map((e) => e.dataset.name)")) == [
            "chalk", "ink", "outline", "pastel"]  # the operator's two beside the two the model ships
        page.check("#adapter-list input[data-name=ink]")
        page.fill('#adapter-list input[data-scale="ink"]', "0.5")
        page.fill("#seed", "4")
        page.click("#generate")
        page.wait_for_function("() => document.querySelector('.panel img')?.naturalWidth === 32")
        assert page.inner_text("[data-stat=adapters]") == "ink ×0.5"
        sent = json.loads(page.text_content(".panel .request pre"))
        assert sent["adapters"] == [{"name": "ink", "scale": 0.5}]
        assert not page.console_errors, page.console_errors
