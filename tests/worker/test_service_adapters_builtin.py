"""LoRA adapters on the built-in model through the whole service: a real torch worker with its
adapter bank. A batch of jobs with different adapters (and none) gives each job its solo image,
with the ClusCa cache on (its state never crosses a job or an adapter boundary); a batch whose
adapters overflow the slots is split; an adapter that does not fit the model is refused at load
and marked unusable in GET /models."""

from __future__ import annotations

import base64
import io
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from clusca_shapes import WEIGHTS_DIR
from tests.support import Service, linear_shapes, submit_shapes, succeeded_job, wait_until, write_lora

WEIGHTS = Path(os.environ.get("CLUSCA_TEST_SHAPES_WEIGHTS", WEIGHTS_DIR))
pytestmark = pytest.mark.skipif(not (WEIGHTS / "model_index.json").exists(),
                                reason=f"no built-in model checkpoint at {WEIGHTS}")
ADAPTERS = ("ink", "chalk", "neon")


@pytest.fixture(scope="module")
def shapes(service: Service, tmp_path_factory):
    """A built-in worker with 2 adapter slots and an API, over an adapters folder of three adapters
    that fit the model and one that does not."""
    from clusca_shapes import ShapesFluxPipeline

    root = tmp_path_factory.mktemp("adapters")
    layers = linear_shapes(ShapesFluxPipeline.from_pretrained(WEIGHTS).transformer)
    for k, name in enumerate(ADAPTERS):
        write_lora(root / "shapes" / f"{name}.safetensors", layers, rank=4, seed=k + 1, scale=1.0, peft=False)
    # The README's example names the adapter the built-in model ships as `outline`; an operator's of
    # the same name wins over a shipped one, so the example runs here whatever ships.
    write_lora(root / "shapes" / "outline", layers, rank=4, seed=7, scale=1.0, peft=True)
    wrong = {m: (fan_in + 8, fan_out) for m, (fan_in, fan_out) in layers.items()}
    write_lora(root / "shapes" / "misfit", wrong, rank=4, seed=9, peft=True)
    folder = tmp_path_factory.mktemp("shapes-adapters")
    models = folder / "models.yaml"
    models.write_text(f"models:\n  - name: shapes\n    kind: builtin\n    path: {WEIGHTS}\n"
                      "    adapters: {slots: 2, max_per_request: 2, pins: [ink]}\n")
    env = {"CLUSCA_ADAPTERS_DIR": str(root), "CLUSCA_MODELS": str(models), "CLUSCA_DEFAULT_MODEL": "shapes"}
    worker = service.start_worker("shapes", {**env, "CLUSCA_MAX_BATCH": "4", "CLUSCA_VISIBILITY_TIMEOUT_S": "60"},
                                  timeout=180)
    try:
        with service.api(env) as url:
            yield service, url
    finally:
        Service.stop(worker, timeout=60)


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def _solo(c, **body) -> dict:
    r = c.post("/generate", json={"model": "shapes", **body}, timeout=240)
    assert r.status_code == 200, r.text
    out = r.json()
    out["png"] = base64.b64decode(out["images"][0])
    return out


@pytest.mark.parametrize("cache", ["off", "fast"])
def test_a_mixed_adapter_batch_gives_each_job_its_solo_image(shapes, cache):
    _, url = shapes
    asks = [dict(prompt="a red circle on the left", seed=40, adapters=[{"name": "ink", "scale": 1.0}]),
            dict(prompt="a blue square", seed=41, adapters=[{"name": "chalk", "scale": 0.7}, {"name": "ink"}]),
            dict(prompt="a red circle on the left", seed=40)]
    common = dict(steps=10, cache={"preset": cache})
    with httpx.Client(base_url=url, timeout=60) as c:
        ahead = submit_shapes(c, prompt="a green triangle", steps=50, seed=1, num_images=4, cache={"preset": "off"})
        time.sleep(0.3)
        ids = [submit_shapes(c, **a, **common) for a in asks]
        together = [succeeded_job(c, j, timeout=240) for j in ids]
        succeeded_job(c, ahead, timeout=240)
        alone = [_solo(c, **a, **common) for a in asks]
    assert [j["batch_images"] for j in together] == [3, 3, 3], [j["batch_images"] for j in together]
    for job, solo in zip(together, alone):
        assert job["adapters"] == solo["adapters"] and solo["batch_images"] == 1
        # Float summation order may differ between batch sizes: one rounding level per channel at most.
        assert np.abs(_pixels(job["png"]) - _pixels(solo["png"])).max() <= 2
    # The adapters do change the image: the same prompt and seed without them differ.
    assert np.abs(_pixels(alone[0]["png"]) - _pixels(alone[2]["png"])).max() > 20
    if cache == "fast":
        assert all(j["cache_stats"]["cached_steps"] > 0 for j in together)


def test_a_batch_whose_adapters_overflow_the_slots_is_split(shapes):
    _, url = shapes
    asks = [dict(prompt=f"a red circle {k}", seed=50 + k, adapters=[{"name": name}]) for k, name in enumerate(ADAPTERS)]
    with httpx.Client(base_url=url, timeout=60) as c:
        ahead = submit_shapes(c, prompt="a green triangle", steps=50, seed=1, num_images=4, cache={"preset": "off"})
        time.sleep(0.3)
        ids = [submit_shapes(c, **a, steps=8) for a in asks]
        together = [succeeded_job(c, j, timeout=240) for j in ids]
        succeeded_job(c, ahead, timeout=240)
        alone = [_solo(c, **a, steps=8) for a in asks]
    # Three adapters over two slots: the first two share a call, the third runs in the next.
    assert [j["batch_images"] for j in together] == [2, 2, 1]
    for job, solo in zip(together, alone):
        assert np.abs(_pixels(job["png"]) - _pixels(solo["png"])).max() <= 2
    # The third loaded into a slot (evicting one that is not pinned): it was timed.
    assert together[2]["adapter_load_s"] > 0


def test_an_adapter_that_does_not_fit_the_model_is_refused_and_marked(shapes):
    _, url = shapes
    with httpx.Client(base_url=url, timeout=60) as c:
        def marked():
            (m,) = [m for m in c.get("/models").json()["models"] if m["name"] == "shapes"]
            return {a["name"]: a for a in m["adapters"]}.get("misfit", {}).get("loads") is False and m

        m = wait_until(marked, timeout=30, what="the worker's verdict on misfit")
        by = {a["name"]: a for a in m["adapters"]}
        assert "in the adapter but" in by["misfit"]["problem"], by["misfit"]
        assert all(by[n]["loads"] for n in ADAPTERS)
        assert "ink" in m["workers"][0]["adapters_loaded"]  # pinned: loaded at start
        r = c.post("/generate", json={"model": "shapes", "prompt": "p", "adapters": [{"name": "misfit"}]})
    assert r.status_code == 422 and "cannot be used" in r.json()["error"]["message"], r.text


def test_the_readme_adapter_example_works_as_typed(shapes, tmp_path):
    import re
    import subprocess

    from tests.support import ROOT

    readme = (ROOT / "README.md").read_text()
    curl = re.findall(r"```bash\n(curl .*?)```", readme[readme.index("With a LoRA adapter"):], re.S)[0]
    _, url = shapes
    res = subprocess.run(["bash", "-o", "pipefail", "-c", curl.replace("127.0.0.1:8000", url.removeprefix("http://"))],
                         cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    assert "outline" in res.stdout and Image.open(tmp_path / "outline.png").size == (32, 32)


def test_an_openai_edit_takes_adapters_as_a_form_field(shapes):
    _, url = shapes
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(png, "PNG")
    with httpx.Client(base_url=url, timeout=240) as c:
        r = c.post("/v1/images/edits", data={"prompt": "a blue square", "adapters": "ink:0.5,chalk", "seed": "3"},
                   files={"image": ("in.png", png.getvalue(), "image/png")})
        assert r.status_code == 200, r.text
        job = c.get(f"/jobs/{r.json()['id']}").json()
        assert job["adapters"] == [{"name": "ink", "scale": 0.5}, {"name": "chalk", "scale": 1.0}]
        bad = c.post("/v1/images/edits", data={"prompt": "a blue square", "adapters": "nope"},
                     files={"image": ("in.png", png.getvalue(), "image/png")})
    assert bad.status_code == 422 and "has no adapter 'nope'" in bad.json()["error"]["message"], bad.text


def test_calls_with_adapters_keep_their_capture_setting():
    # The bank's selection lives in buffers written in place and its state keys the recorded steps
    # (tests/worker/test_service_adapters_capture.py runs such calls), so nothing is turned off.
    from clusca.config import ClusCaConfig

    from service.contract import AdapterUse, JobRequest
    from service.worker.runners.base import Batch
    from service.worker.runners.diffusers import DiffusersRunner

    cache = ClusCaConfig.from_dict({"preset": "fast"})
    plain = JobRequest(prompt="p", width=32, height=32, steps=8, guidance=5.0, seed=1, cache=cache)
    adapted = JobRequest(prompt="p", width=32, height=32, steps=8, guidance=5.0, seed=2, cache=cache,
                         adapters=(AdapterUse("ink"),))
    for batch in (Batch.of([plain]), Batch.of([adapted]), Batch.of([plain, adapted])):
        assert DiffusersRunner.cache_of(batch) is cache and cache.capture == "auto"
