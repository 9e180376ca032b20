"""The shipped built-in model: offline loading, call convention, determinism, adherence."""

from __future__ import annotations

import math
import time

import numpy as np
import PIL.Image
import pytest
import torch

from clusca_shapes import WEIGHTS_DIR, ShapesFluxPipeline
from clusca_shapes.tools import checker, data

SEED = 1234
FEW = 4  # steps for tests of the call convention; quality tests use the default


@pytest.fixture(scope="module")
def pipe():
    return ShapesFluxPipeline.from_pretrained(WEIGHTS_DIR)


def gen(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_weights_are_small_safetensors():
    files = [p for p in WEIGHTS_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 1024 * 1024
    assert any(p.suffix == ".safetensors" for p in files)
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".ckpt") for p in files)


def test_loads_offline_and_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    p = ShapesFluxPipeline.from_pretrained(WEIGHTS_DIR)
    elapsed = time.perf_counter() - t0
    assert elapsed < 3.0, f"loading took {elapsed:.2f} s"
    from diffusers import FluxTransformer2DModel

    assert isinstance(p.transformer, FluxTransformer2DModel)
    assert len(p.transformer.transformer_blocks) >= 1 and len(p.transformer.single_transformer_blocks) >= 1


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="model_index.json"):
        ShapesFluxPipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize("output_type", ["pil", "np", "pt"])
def test_output_shape_and_dtype(pipe, output_type):
    images = pipe("a red circle", num_images_per_prompt=2, generator=[gen(1), gen(2)],
                  num_inference_steps=FEW, output_type=output_type).images
    if output_type == "pil":
        assert len(images) == 2
        assert all(isinstance(im, PIL.Image.Image) and im.size == (32, 32) and im.mode == "RGB" for im in images)
    elif output_type == "np":
        assert images.shape == (2, 32, 32, 3) and images.dtype == np.float32
        assert images.min() >= 0 and images.max() <= 1
    else:
        assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32


def test_runs_under_inference_mode_without_leaking_inference_tensors(pipe):
    seen: list[bool] = []

    def on_step(p, i, t, kw):
        seen.append(torch.is_inference_mode_enabled() and kw["latents"].is_inference())
        return kw

    images = pipe("a red circle", generator=gen(), num_inference_steps=2, output_type="pt",
                  callback_on_step_end=on_step).images
    assert seen == [True, True]  # the denoising loop has no autograd bookkeeping
    assert not torch.is_inference_mode_enabled()
    # The returned tensor is a plain one: usable in place and with autograd.
    assert not images.is_inference()
    images.mul_(2)
    w = torch.ones((), requires_grad=True)
    (images * w).sum().backward()
    assert w.grad is not None
    # The model itself is untouched: it still trains after a pipeline call.
    tr = pipe.transformer
    assert not any(p.is_inference() for p in tr.parameters())
    seq, pooled = pipe.text_encoder(*[t for t in pipe.tokenizer(["a red circle"])])
    assert seq.requires_grad


def test_other_sizes_follow_the_patch_grid(pipe):
    img = pipe("a blue square", height=48, width=32, num_inference_steps=FEW, generator=gen()).images[0]
    assert img.size == (32, 48)


def test_same_seed_same_image_other_seed_other_image(pipe):
    kw = {"num_inference_steps": FEW, "output_type": "np"}
    a = pipe("a green triangle at the top", generator=gen(5), **kw).images
    b = pipe("a green triangle at the top", generator=gen(5), **kw).images
    c = pipe("a green triangle at the top", generator=gen(6), **kw).images
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 1e-3


def test_batch_equals_each_image_alone(pipe):
    prompts = ["a red circle on the left", "a yellow square at the bottom"]
    kw = {"num_inference_steps": FEW, "output_type": "np"}
    both = pipe(prompts, generator=[gen(11), gen(12)], **kw).images
    first = pipe(prompts[0], generator=gen(11), **kw).images[0]
    second = pipe(prompts[1], generator=gen(12), **kw).images[0]
    np.testing.assert_allclose(both[0], first, atol=2e-4)
    np.testing.assert_allclose(both[1], second, atol=2e-4)


ODD_PROMPTS = ["", "   ", "purple elephant dancing", "☃☃☃ 🚀", "日本語のプロンプト", "a" * 5000,
               "red circle " * 200, "RED CIRCLE, LEFT!!!", "<unk> <pad> <bos>", "1234 5678"]


def test_odd_prompts_give_an_image(pipe):
    images = pipe(ODD_PROMPTS, generator=[gen(i) for i in range(len(ODD_PROMPTS))],
                  num_inference_steps=FEW, output_type="np").images
    assert images.shape == (len(ODD_PROMPTS), 32, 32, 3) and np.isfinite(images).all()
    assert pipe(None, num_inference_steps=FEW, generator=gen()).images[0].size == (32, 32)


def test_negative_prompt_and_no_guidance_paths(pipe):
    kw = {"num_inference_steps": FEW, "output_type": "np", "generator": gen()}
    a = pipe("a red circle", negative_prompt="a blue square", **kw).images
    b = pipe("a red circle", guidance_scale=1.0, **{**kw, "generator": gen()}).images
    assert a.shape == b.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("kwargs, word", [
    ({"height": 30}, "height"),
    ({"width": 0}, "width"),
    ({"width": 4096}, "width"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 2.5}, "num_inference_steps"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"guidance_scale": math.nan}, "guidance_scale"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
    ({"output_type": "jpeg"}, "output_type"),
    ({"generator": [torch.Generator()] * 3}, "generator"),
    ({"negative_prompt": ["x", "y"]}, "negative_prompt"),
    ({"prompt": 123}, "prompt"),
    ({"prompt": []}, "prompt"),
])
def test_bad_arguments_are_clear_value_errors(pipe, kwargs, word):
    call = {"prompt": "a red circle", **kwargs}
    with pytest.raises(ValueError, match=word):
        pipe(**call)


def test_callback_sees_every_step_and_can_interrupt(pipe):
    seen = []

    def record(p, i, t, kw):
        seen.append((i, float(t), tuple(kw["latents"].shape)))
        return {}

    pipe("a red circle", num_inference_steps=6, generator=gen(), callback_on_step_end=record)
    assert [s[0] for s in seen] == list(range(6))
    assert all(a[1] > b[1] for a, b in zip(seen, seen[1:]))  # noise level decreases

    calls = []

    def stop_after_two(p, i, t, kw):
        calls.append(i)
        if i == 1:
            p._interrupt = True
        return {}

    out = pipe("a red circle", num_inference_steps=6, generator=gen(), callback_on_step_end=stop_after_two)
    assert calls == [0, 1] and len(out.images) == 1
    # The flag is reset by the next call, so a cancelled job does not poison the pipeline.
    assert len(pipe("a red circle", num_inference_steps=2, generator=gen()).images) == 1
    assert pipe._interrupt is False


HANDWRITTEN = [
    ("a red circle on the left", data.Scene("white", (data.SceneObject("circle", "red", 9.5, 16, 8),), position="left")),
    ("a blue square at the top", data.Scene("white", (data.SceneObject("square", "blue", 16, 9.5, 8),), position="top")),
    ("a green triangle in the middle", data.Scene("white", (data.SceneObject("triangle", "green", 16, 16, 8),), position="centre")),
    ("a yellow circle at the bottom on a black background", data.Scene("black", (data.SceneObject("circle", "yellow", 16, 22.5, 8),), position="bottom")),
    ("an orange square on the right", data.Scene("white", (data.SceneObject("square", "orange", 22.5, 16, 8),), position="right")),
    ("a purple triangle on the left", data.Scene("white", (data.SceneObject("triangle", "purple", 9.5, 16, 8),), position="left")),
]


def test_handwritten_prompts_get_colour_and_position(pipe):
    prompts = [p for p, _ in HANDWRITTEN]
    images = pipe(prompts, generator=[gen(SEED + i) for i in range(len(prompts))], output_type="np").images
    results = [checker.check(img, scene) for img, (_, scene) in zip(images, HANDWRITTEN)]
    wrong = [(p, r.position) for (p, _), r in zip(HANDWRITTEN, results) if not (r.colour_ok and r.position_ok)]
    assert not wrong, wrong


def test_benchmark_prompts_sample_meets_the_shipped_quality(pipe):
    # Thresholds sit a margin below what the shipped weights measure on this sample, every
    # prompt form in it (see docs/model_card.md); a broken checkpoint or pipeline, or weights
    # that lost relations or counts, score well below.
    items = data.eval_set(24)
    images = checker.generate_eval_images(pipe, [p for p, _ in items], seed=SEED, batch=24)
    scenes = [s for _, s in items]
    summary = checker.summarise([checker.check(i, s) for i, s in zip(images, scenes)], scenes)
    assert summary["colour"] >= 90 and summary["position"] >= 90 and summary["count"] >= 85, summary
    assert summary["adherence"] >= 80, summary
    assert all(g["adherence"] >= 60 for g in summary["groups"].values()), summary["groups"]


def test_clusca_attaches_like_on_a_large_flux_pipeline():
    from clusca import ClusCaConfig, apply_clusca, clusca_run, remove_clusca

    p = ShapesFluxPipeline.from_pretrained(WEIGHTS_DIR)
    prompts = ["a red circle on the left", "a blue square at the top", "a green triangle in the middle"]
    kw = {"output_type": "np"}  # the shipped defaults: 40 steps, guidance 5
    base = p(prompts, generator=[gen(i) for i in range(3)], **kw).images
    other_seed = p(prompts, generator=[gen(100 + i) for i in range(3)], **kw).images
    apply_clusca(p.transformer)
    try:
        with clusca_run(p.transformer, ClusCaConfig.preset("balanced"), num_inference_steps=p.default_steps) as run:
            cached = p(prompts, generator=[gen(i) for i in range(3)], **kw).images
        stats = run.stats.to_dict()
        # One transformer call per step (guidance halves are batched), most steps cached.
        assert stats["calls"] == p.default_steps and stats["cached_steps"] > stats["full_steps"] > 0
        # The cache approximates the same sample: closer to it than another seed's sample is.
        err, spread = float(np.mean((base - cached) ** 2)), float(np.mean((base - other_seed) ** 2))
        assert 0 < err < spread / 2, (err, spread)
        # Outside a run the hooked model is the plain model again.
        again = p(prompts, generator=[gen(i) for i in range(3)], **kw).images
        np.testing.assert_allclose(again, base, atol=1e-5)
    finally:
        remove_clusca(p.transformer)
