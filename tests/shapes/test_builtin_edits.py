"""The built-in pipeline edits without retraining: image-to-image and inpainting on its flow-matching schedule."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from clusca_shapes import WEIGHTS_DIR, ShapesFluxPipeline
from clusca_shapes.pipeline import edit_start

STEPS = 12


@pytest.fixture(scope="module")
def pipe():
    return ShapesFluxPipeline.from_pretrained(WEIGHTS_DIR)


def gen(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def source(pipe) -> PIL.Image.Image:
    return pipe(prompt="a red circle on the left", generator=gen(1), num_inference_steps=STEPS).images[0]


def _mask(box) -> PIL.Image.Image:
    m = PIL.Image.new("L", (32, 32), 0)
    m.paste(255, box)
    return m


def px(im: PIL.Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_strength_one_without_a_mask_is_text_to_image(pipe, source, one_torch_thread):
    a = pipe(prompt="a blue square", generator=gen(2), num_inference_steps=STEPS, image=source, strength=1.0)
    b = pipe(prompt="a blue square", generator=gen(2), num_inference_steps=STEPS)
    assert np.array_equal(px(a.images[0]), px(b.images[0]))


@pytest.mark.parametrize("strength", [0.25, 0.5, 0.8])
def test_image_to_image_runs_the_last_strength_share_of_the_steps(pipe, source, strength, one_torch_thread):
    seen: list[int] = []

    def on_step(_pipe, i, t, kwargs):
        seen.append(i)
        return kwargs

    out = pipe(prompt="a blue square", generator=gen(3), num_inference_steps=STEPS, image=source,
               strength=strength, callback_on_step_end=on_step).images[0]
    assert seen == list(range(STEPS - edit_start(STEPS, strength)))
    assert pipe.num_timesteps == len(seen) and out.size == source.size


def test_a_lower_strength_keeps_more_of_the_image(pipe, source, one_torch_thread):
    err = [float(np.abs(px(pipe(prompt="a blue square", generator=gen(4), num_inference_steps=STEPS, image=source,
                                    strength=s).images[0]) - px(source)).mean()) for s in (0.2, 0.6, 1.0)]
    assert err[0] < err[1] < err[2]


def test_inpainting_keeps_the_pixels_outside_each_mask_exactly(pipe, source, one_torch_thread):
    masks = [_mask((16, 0, 32, 32)), _mask((0, 0, 32, 16))]
    out = pipe(prompt=["a blue square on the right", "a green triangle at the top"], generator=gen(5, 6),
               num_inference_steps=STEPS, image=[source, source], mask_image=masks, strength=1.0).images
    for im, m in zip(out, masks):
        keep = np.asarray(m) < 128
        assert np.array_equal(px(im)[keep], px(source)[keep])
        assert np.abs(px(im)[~keep] - px(source)[~keep]).mean() > 5  # the masked part was redrawn


def test_a_batch_of_edits_equals_its_solo_runs(pipe, source, one_torch_thread):
    other = pipe(prompt="a yellow square", generator=gen(9), num_inference_steps=STEPS).images[0]
    masks = [_mask((8, 8, 24, 24)), _mask((0, 16, 32, 32))]
    kw = dict(num_inference_steps=STEPS, strength=0.7)
    both = pipe(prompt=["a blue circle", "a red triangle"], generator=gen(7, 8), image=[source, other],
                mask_image=masks, **kw).images
    alone = [pipe(prompt=[p], generator=gen(s), image=im, mask_image=m, **kw).images[0]
             for p, s, im, m in (("a blue circle", 7, source, masks[0]), ("a red triangle", 8, other, masks[1]))]
    for b, a in zip(both, alone):
        assert np.abs(px(b) - px(a)).max() <= 2  # float summation order may differ between batch sizes


@pytest.mark.parametrize("kwargs,words", [
    ({"mask_image": "m"}, "needs an image"),
    ({"image": "src", "strength": 0.0}, "strength must be"),
    ({"image": "src", "strength": 1.5}, "strength must be"),
    ({"image": "src", "width": 64, "height": 64}, "but the call asks for 64x64"),
    ({"image": "src", "mask_image": "small"}, "mask_image is 16x16"),
    ({"image": ["src", "src", "src"]}, "image has 3 entries"),
    ({"image": "not an image"}, "must be a PIL image"),
])
def test_bad_edit_arguments_are_refused_by_name(pipe, source, kwargs, words):
    swap = {"src": source, "m": _mask((0, 0, 8, 8)), "small": PIL.Image.new("L", (16, 16), 255)}
    kwargs = {k: [swap.get(x, x) for x in v] if isinstance(v, list) else swap.get(v, v) if isinstance(v, str) else v
              for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=words):
        pipe(prompt=["a", "b"], generator=gen(1, 2), num_inference_steps=2, **kwargs)


def test_a_mask_aware_cache_inpaints_at_least_as_close_to_uncached_as_plain_clusca(pipe, one_torch_thread):
    """Edits of the edit set at a setting where propagation matters (K 16, gamma 0.2): clustering the
    mask apart keeps kept-region values out of it and gives it most fresh tokens."""
    from clusca import ClusCaConfig, apply_clusca, clusca_run, remove_clusca
    from clusca_shapes.evaluation import edit_set

    edits, _ = edit_set(4)  # +0.25 dB on these at 20 to 40 steps
    prompts = [e["base"] for e in edits]
    bases = pipe(prompt=prompts, generator=gen(*range(4)), num_inference_steps=20).images
    masks = [_mask(e["box"]) for e in edits]
    inside = [np.asarray(m) >= 128 for m in masks]
    apply_clusca(pipe.transformer)

    def edit(cfg):
        with clusca_run(pipe.transformer, cfg, num_inference_steps=20) as run:
            run.set_token_mask([torch.from_numpy(m) for m in inside])
            return pipe(prompt=[e["prompt"] for e in edits], generator=gen(*range(4)), num_inference_steps=20,
                        image=bases, mask_image=masks, strength=1.0).images

    def psnr_inside(images, ref):
        mse = [((px(a).astype(float) - px(b)) ** 2)[m].mean() for a, b, m in zip(images, ref, inside)]
        return float(np.mean([10 * np.log10(255.0 ** 2 / max(e, 1e-9)) for e in mse]))

    try:
        ref = edit(ClusCaConfig(mode="off"))
        base_cfg = dict(interval=4, order=0, clusters=16, gamma=0.2)
        aware = psnr_inside(edit(ClusCaConfig.preset("balanced", **base_cfg)), ref)
        plain = psnr_inside(edit(ClusCaConfig.preset("balanced", **base_cfg, mask_share=0.0)), ref)
    finally:
        remove_clusca(pipe.transformer)
    assert aware >= plain, (aware, plain)
