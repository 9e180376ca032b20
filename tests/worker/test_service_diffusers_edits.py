"""Diffusers image-to-image and inpainting pipelines driven by the runner: the call gets the edit's
``image``, ``strength`` and ``mask_image``, the ClusCa run schedules the steps the pipeline really
denoises, and progress still counts the whole schedule. Tiny random FLUX weights, built here."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from clusca.config import ClusCaConfig

from service.contract import JobRequest, denoised_steps
from service.registry import ModelEntry
from service.worker.runners import Batch, RequestNotSupported
from service.worker.runners.diffusers import DiffusersRunner
from tests.worker.test_service_diffusers import SEQ, build_tiny_flux

STEPS = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyflux-edits")
    build_tiny_flux(root / "pipe")
    return root / "pipe"


def _runner(folder, pipeline_class: str) -> DiffusersRunner:
    entry = ModelEntry(name="flux-edit", kind="diffusers", path=str(folder), pipeline_class=pipeline_class,
                       defaults={"width": 32, "height": 32, "steps": STEPS, "guidance": 3.5, "cache": "off"},
                       options={"warmup": False, "call_kwargs": {"max_sequence_length": SEQ}})
    return DiffusersRunner.load(entry, "cpu", torch_threads=1)


def _batch(strength: float, masked: bool, cache: ClusCaConfig) -> Batch:
    req = JobRequest(prompt="a red circle", width=32, height=32, steps=STEPS, guidance=3.5, seed=3, cache=cache,
                     image="a" * 64, mask="b" * 64 if masked else None, strength=strength)
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    return Batch.of([req], [(image, mask if masked else None)])


@pytest.mark.parametrize("pipeline_class,masked", [("FluxImg2ImgPipeline", False), ("FluxInpaintPipeline", True)])
def test_the_call_takes_the_edit_and_the_cache_counts_the_steps_denoised(folder, pipeline_class, masked,
                                                                         one_torch_thread):
    runner = _runner(folder, pipeline_class)
    assert runner.entry.edits == ("inpaint" if masked else "image")
    cache = ClusCaConfig.from_dict({"mode": "fora", "interval": 2, "warmup": 1})
    batch = _batch(0.5, masked, cache)
    steps_seen: list[int] = []
    out = runner.run(batch, lambda step: steps_seen.append(step) and False)
    n = denoised_steps(STEPS, 0.5)
    assert len(out.images) == 1 and out.images[0].size == (32, 32)
    assert steps_seen == list(range(STEPS - n + 1, STEPS + 1))  # progress ends at the schedule's last step
    assert out.stats.full_steps + out.stats.cached_steps == n
    assert out.stats.full_steps == len(cache.full_steps(n))  # warm-up and interval from the first denoised step


def test_a_pipeline_that_takes_no_image_refuses_an_edit_before_running(folder, one_torch_thread):
    runner = _runner(folder, "FluxPipeline")
    with pytest.raises(RequestNotSupported, match="image"):
        runner.run(_batch(0.5, False, ClusCaConfig.from_dict({"mode": "off"})), lambda step: False)


def test_an_inpainting_call_clusters_the_mask_apart_on_the_transformer_token_grid(folder, one_torch_thread):
    from clusca import run_state

    runner = _runner(folder, "FluxInpaintPipeline")
    transformer = runner.pipe.transformer
    seen = []

    def after(mod, args, out):
        c = run_state(transformer).clusters("image")
        if c is not None:
            seen.append(c.assign[0].clone())

    handle = transformer.register_forward_hook(after)
    try:
        runner.run(_batch(1.0, True, ClusCaConfig.from_dict({"mode": "clusca", "interval": 2, "warmup": 1})),
                   lambda step: False)
    finally:
        handle.remove()
    # 32 x 32 pixels -> 8 x 8 tokens; the mask is the image's left half, so the grid's left 4 columns.
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[:, :4] = True
    inside = inside.reshape(-1)
    assert seen and all(not set(a[inside].tolist()) & set(a[~inside].tolist()) for a in seen)
    assert len(set(seen[-1][inside].tolist())) >= 12  # mask_share 0.75 of 16 clusters
