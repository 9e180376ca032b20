"""The shipped style adapters: their drawing styles, the checker that tells them, the trainer's
LoRA mode that made them, and the adapters themselves on the built-in model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clusca.lora import LoraBank, load_lora
from clusca_shapes import WEIGHTS_DIR, ShapesFluxPipeline
from clusca_shapes.evaluation import ADAPTER_STYLES, ADAPTERS_DIR, style_check
from clusca_shapes.tools import checker, data, styles, train
from clusca_shapes.tools.lora_train import FLUX_TARGETS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WHITE, RED, PINK = (245, 245, 245), (220, 30, 30), (229, 105, 105)


def _canvas(colour=WHITE) -> np.ndarray:
    img = np.empty((32, 32, 3), dtype=np.uint8)
    img[:] = colour
    return img


def test_synthetic_images_show_the_style_drawn_and_no_other():
    solid = _canvas()
    solid[8:24, 8:24] = RED
    ring = _canvas()
    ring[8:24, 8:24] = RED
    ring[10:22, 10:22] = WHITE
    soft = _canvas()
    soft[8:24, 8:24] = PINK  # red at 65% over white
    dark_soft = _canvas((15, 15, 15))
    dark_soft[8:24, 8:24] = (148, 30, 30)  # red at 65% over black
    cases = {"solid": (solid, False, False), "ring": (ring, True, False), "soft": (soft, False, True),
             "dark soft": (dark_soft, False, True), "empty": (_canvas(), False, False)}
    for name, (img, outline, pastel) in cases.items():
        assert checker.shows_outline(img) is outline, name
        assert checker.shows_pastel(img) is pastel, name
        assert style_check("outline")(img) is outline and style_check("pastel")(img) is pastel, name
    with pytest.raises(ValueError, match="unknown style"):
        style_check("sepia")


def test_an_outline_is_judged_as_the_shape_it_encloses():
    ring = np.zeros((12, 12), dtype=bool)
    ring[2:10, 2:10] = True
    ring[4:8, 4:8] = False
    assert checker.fill_holes(ring).sum() == 64
    open_ring = ring.copy()
    open_ring[5, 2:4] = False  # a gap to the outside: nothing enclosed
    assert (checker.fill_holes(open_ring) == open_ring).all()


def test_every_scene_drawn_in_a_style_shows_it_and_still_follows_its_prompt():
    items = data.eval_set(40)
    for style in (None, *styles.STYLES):
        images = [styles.render(s, style) for _, s in items]
        ok = [checker.check(img, s).ok for img, (_, s) in zip(images, items)]
        assert sum(ok) >= len(items) - 1, (style, ok)
        for st in styles.STYLES:
            shown = sum(checker.shows_style(img, st) for img in images)
            assert shown == (len(items) if st == style else 0), (style, st, shown)
    plain = styles.render(items[0][1], None)
    assert np.array_equal(plain, data.render(items[0][1]))


def test_every_outline_is_one_unbroken_ring_around_an_inside():
    # A ring broken in two reads as two objects; the line is thick enough to stay whole
    # (4-connected, at half coverage) on every object of the evaluation scenes, and thin
    # enough to leave each one an inside.
    for _, scene in data.eval_set(120):
        for obj in scene.objects:
            line = styles.coverage(obj, "outline") >= 0.5
            assert len(checker.components(line)) == 1, (scene, obj)
            inside = checker.fill_holes(line) & ~line
            assert inside.sum() >= 1, (scene, obj)
    assert styles.outline_width(8.0, "circle") > 3 > styles.outline_width(8.0, "triangle") >= styles.OUTLINE_WIDTH[0]


def test_the_lora_mode_trains_only_the_adapter_and_writes_a_peft_folder(tmp_path, capsys):
    out = tmp_path / "outline"
    base = {k: v.clone() for k, v in ShapesFluxPipeline.from_pretrained(WEIGHTS_DIR).transformer.state_dict().items()}
    assert train.main(["--out", str(out), "--lora-rank", "4", "--style", "outline", "--steps", "2", "--batch", "4",
                       "--threads", "1", "--warmup", "1", "--log-every", "1"]) == 0
    assert "LoRA rank 4 on 30 linears" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4.0 and "attn.to_q" in config["target_modules"]
    weights = load_lora(out)
    assert weights.rank == 4 and len(weights.layers) == 30 and weights.scaling == 1.0
    assert any(b.abs().max() > 0 for _, b in weights.layers.values())  # B left zero: it learnt nothing
    pipe = ShapesFluxPipeline.from_pretrained(WEIGHTS_DIR)
    assert all(torch.equal(base[k], v) for k, v in pipe.transformer.state_dict().items())
    LoraBank(pipe.transformer, FLUX_TARGETS, slots=1, max_rank=16).load(1, weights)
    # --lora-init goes on from that adapter and counts its steps.
    more = tmp_path / "more"
    assert train.main(["--out", str(more), "--lora-rank", "4", "--style", "outline", "--lora-init", str(out),
                       "--steps", "1", "--batch", "4", "--threads", "1", "--warmup", "1", "--lr", "1e-9"]) == 0
    assert json.loads((more / "adapter_config.json").read_text())["steps"] == 3
    again = load_lora(more)
    assert all(torch.allclose(again.layers[m][0], a, atol=1e-6) for m, (a, _) in weights.layers.items())
    with pytest.raises(ValueError, match="not rank 8"):
        train.main(["--out", str(tmp_path / "bad"), "--lora-rank", "8", "--lora-init", str(out), "--steps", "1",
                    "--batch", "4", "--threads", "1"])


@pytest.fixture(scope="module")
def adapted():
    torch.set_num_threads(1)
    pipe = ShapesFluxPipeline.from_pretrained(WEIGHTS_DIR)
    bank = LoraBank(pipe.transformer, FLUX_TARGETS, slots=len(ADAPTER_STYLES), max_rank=16)
    for slot, name in enumerate(ADAPTER_STYLES, 1):
        bank.load(slot, load_lora(ADAPTERS_DIR / name, name=name))
    yield pipe, bank
    bank.remove()


def test_every_shipped_adapter_is_a_small_peft_folder_the_bank_takes(adapted):
    _, bank = adapted
    assert bank.loaded == {i: n for i, n in enumerate(ADAPTER_STYLES, 1)}
    for name in ADAPTER_STYLES:
        folder = ADAPTERS_DIR / name
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["r"] <= 16 and config["style"] == name
        assert (folder / "adapter_model.safetensors").stat().st_size < 2 * 2**20


def test_the_checker_command_draws_with_a_shipped_adapter_and_reports_the_styles(capsys):
    assert checker.main(["--adapter", "pastel", "-n", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 2 and summary["styles"] == {"outline": 0.0, "pastel": 100.0}


PROMPTS = ["a red circle on the left", "a blue square above a yellow triangle"]


@pytest.mark.parametrize("style", ADAPTER_STYLES)
def test_a_shipped_adapter_draws_its_style_and_no_adapter_draws_none(adapted, style):
    pipe, bank = adapted
    scenes = [data.parse_prompt(p) for p in PROMPTS]
    slot = ADAPTER_STYLES.index(style) + 1

    def draw(chosen):
        bank.select(chosen)
        gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
        return pipe(PROMPTS, generator=gens, output_type="np").images

    shows = style_check(style)
    for img, scene in zip(draw([[(slot, 1.0)]] * len(PROMPTS)), scenes):
        # Whole adherence on one object and one relation; over the evaluation set it is the
        # benchmark's measure.
        assert shows(img) and checker.check(img, scene).ok
    for img in draw([[]] * len(PROMPTS)):
        assert not shows(img)
