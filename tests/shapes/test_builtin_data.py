"""Data generator, prompt grammar, tokenizer and adherence checker of the built-in model (no weights needed)."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest

from clusca_shapes.tools import checker, data

FLIP = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


def _scenes(n: int, seed: int = 0, **kw) -> list[data.Scene]:
    rng = np.random.default_rng(seed)
    return [data.sample_scene(rng, **kw) for _ in range(n)]


def test_generator_is_deterministic_per_seed():
    a_img, a_cap, _ = data.make_batch(np.random.default_rng(7), 16)
    b_img, b_cap, _ = data.make_batch(np.random.default_rng(7), 16)
    c_img, c_cap, _ = data.make_batch(np.random.default_rng(8), 16)
    assert a_cap == b_cap and np.array_equal(a_img, b_img)
    assert a_cap != c_cap
    assert a_img.shape == (16, 32, 32, 3) and a_img.dtype == np.float32
    assert 0.0 <= a_img.min() and a_img.max() <= 1.0


def test_training_scenes_cover_every_form_and_word():
    rng = np.random.default_rng(0)
    scenes = [data.sample_scene(rng) for _ in range(3000)]
    caps = [data.caption(s, rng) for s in scenes]
    forms = collections.Counter(s.form for s in scenes)
    assert set(forms) == set(data.FORMS)
    assert all(forms[f] > 100 for f in data.FORMS), forms
    assert {o.shape for s in scenes for o in s.objects} == set(data.SHAPES)
    assert {o.colour for s in scenes for o in s.objects} == set(data.COLOURS)
    assert {s.position for s in scenes} >= set(data.POSITIONS)
    assert {s.relation for s in scenes} >= set(data.RELATIONS)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert len({s.background for s in scenes}) == len(data.BACKGROUNDS)
    vocab = set(data.vocabulary())
    used = set()
    for s, c in zip(scenes, caps):
        words = data.split_words(c)
        assert set(words) <= vocab, c
        used.update(words)
        for o in s.objects:
            assert any(w in c for w in data.COLOUR_WORDS[o.colour]), c
            assert any(w in c for w in data.SHAPE_WORDS[o.shape]), c
    assert used == vocab - {"and", "it", "shown", "drawn", "plain", "single"}  # template-only filler words
    assert len(set(caps)) > 1000  # wording varies
    assert not any(" a orange" in c or c.startswith("a orange") for c in caps)


def test_counts_are_plural_and_read_as_the_singular():
    rng = np.random.default_rng(4)
    caps = [data.caption(data.sample_form(rng, f), rng) for f in ("two_of_a_kind", "three_of_a_kind") for _ in range(300)]
    assert all(c.split()[0] in ("two", "three", "there", "a", "an") for c in caps)
    assert any("squares" in c for c in caps) and any("boxes" in c for c in caps) and any("round dots" in c for c in caps)
    assert data.split_words("Two blue Squares, three round dots") == ["two", "blue", "square", "three", "round", "dot"]


def test_every_caption_parses_back_to_its_scene():
    rng = np.random.default_rng(2)
    for _ in range(3000):
        truth = data.sample_scene(rng)
        text = data.caption(truth, rng)
        got = data.parse_prompt(text)
        assert got is not None, text
        assert got.form == truth.form, text
        assert [(o.shape, o.colour) for o in got.objects] == [(o.shape, o.colour) for o in truth.objects], text
        assert (got.position, got.relation, got.mention_background) == \
            (truth.position, truth.relation, truth.mention_background), text
        if truth.mention_background:
            assert got.background == truth.background, text


@pytest.mark.parametrize("text, form, objects, where", [
    ("a green triangle", "one_unplaced", [("triangle", "green")], None),
    ("Two blue squares", "two_of_a_kind", [("square", "blue")] * 2, None),
    ("three red circles on a dark background", "three_of_a_kind", [("circle", "red")] * 3, None),
    ("a violet box to the right of an orange disc", "relation", [("square", "purple"), ("circle", "orange")], "right of"),
    ("a black round dot in the center", "one_black_white", [("circle", "black")], "centre"),
])
def test_typed_prompts_parse(text, form, objects, where):
    s = data.parse_prompt(text)
    assert s.form == form and [(o.shape, o.colour) for o in s.objects] == objects
    assert (s.relation or s.position) == where


@pytest.mark.parametrize("text", ["", "hello there", "a red circle above a red square", "two red circles above a blue box",
                                  "a red circle beside a blue square", "a red circle on a pink background"])
def test_prompts_outside_the_grammar_parse_to_none(text):
    assert data.parse_prompt(text) is None


def test_objects_stand_out_keep_a_margin_and_do_not_touch():
    for s in _scenes(3000, seed=9):
        for o in s.objects:
            assert o.colour != s.background
            assert min(o.x - o.radius, o.y - o.radius) >= data.MARGIN - 1e-9
            assert max(o.x + o.radius, o.y + o.radius) <= data.IMAGE_SIZE - data.MARGIN + 1e-9
        if s.relation is not None:
            assert s.objects[0].colour != s.objects[1].colour
        elif len(s.objects) > 1:
            assert len({(o.colour, o.shape) for o in s.objects}) == 1
        # Objects of one colour must stay apart, or the checker would see one blob.
        masks = [checker._dilate(data._coverage(o, 32, 4) > 0) for o in s.objects]
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                assert not (masks[i] & (data._coverage(s.objects[j], 32, 4) > 0)).any(), s


def test_each_count_has_one_layout():
    # A count drawn in one of several layouts taught the model to blend them (four blobs
    # for "three"): two stand side by side, three make a triangle with its apex up.
    rng = np.random.default_rng(5)
    for form in ("two_of_a_kind", "three_of_a_kind"):
        for _ in range(200):
            objs = sorted(data.sample_form(rng, form).objects, key=lambda o: (o.y, o.x))
            if form == "two_of_a_kind":
                assert abs(objs[0].y - objs[1].y) < 1e-9 and abs(objs[0].x - objs[1].x) > 10
            else:
                top, left, right = objs[0], *sorted(objs[1:], key=lambda o: o.x)
                assert top.y + 10 < min(left.y, right.y) and left.x < top.x < right.x


def test_mono_false_leaves_out_black_and_white():
    assert not any(o.colour in data.MONO for s in _scenes(800, seed=3, mono=False) for o in s.objects)


def test_eval_set_is_fixed_and_covers_every_form():
    a, b = data.eval_set(), data.eval_set()
    assert len(a) >= 400
    assert [p for p, _ in a] == [p for p, _ in b] and [s for _, s in a] == [s for _, s in b]
    forms = collections.Counter(s.form for _, s in a)
    assert set(forms) == set(data.FORMS) and min(forms.values()) >= 40, forms
    assert len({p for p, _ in a}) > 0.9 * len(a)
    for text, s in a:
        assert data.parse_prompt(text).form == s.form, text
    # A small set still covers every form, and the first items of a form do not depend on n.
    small = data.eval_set(24)
    assert {s.form for _, s in small} == set(data.FORMS)
    assert all(item in a for item in small)
    only = data.eval_set(30, forms=("relation",))
    assert {s.form for _, s in only} == {"relation"} and len(only) == 30
    with pytest.raises(ValueError, match="unknown forms"):
        data.eval_set(10, forms=("pentagon",))


def test_checker_accepts_every_rendered_ground_truth_as_clean():
    items = data.eval_set()
    scenes = [s for _, s in items] + _scenes(600, seed=21)
    results = [checker.check(data.render(s), s) for s in scenes]
    summary = checker.summarise(results, scenes)
    assert summary["adherence"] == 100.0 and summary["clean"] == 100.0, summary
    assert set(summary["forms"]) == set(data.FORMS)
    assert all(m["adherence"] == 100.0 and m["stray_px"] <= 1 and m["touches_frame"] == 0 for m in summary["forms"].values())
    # Judged from the prompt alone, as a typed prompt would be.
    for text, s in items[:120]:
        assert checker.check(data.render(s), data.parse_prompt(text)).ok, text


def test_checker_is_robust_to_mild_noise_and_uint8_input():
    rng = np.random.default_rng(1)
    items = data.eval_set()
    ok = []
    for _, s in items:
        img = np.clip(data.render(s) + rng.normal(0, 0.04, (32, 32, 3)), 0, 1)
        ok.append(checker.check((img * 255).astype(np.uint8), s).ok)
    assert np.mean(ok) >= 0.98
    assert all(ok[i] for i, (_, s) in enumerate(items) if s.form in ("one_placed", "one_unplaced"))


def test_checker_finds_the_background_drawn_when_the_prompt_names_none():
    for s in _scenes(200, seed=12, mono=False):
        other = next(b for b in data.BACKGROUNDS if b != s.background)
        res = checker.check(data.render(dataclasses.replace(s, background=other)), s)
        assert res.ok and res.background == other and res.edge.clean


def _swap(scene: data.Scene, **changes) -> data.Scene:
    objs = list(scene.objects)
    objs[0] = dataclasses.replace(objs[0], **changes)
    return dataclasses.replace(scene, objects=tuple(objs))


@pytest.mark.parametrize("form", data.FORMS)
@pytest.mark.parametrize("field", ["colour", "shape"])
def test_checker_rejects_a_wrong_colour_or_shape_in_every_form(form, field):
    rng = np.random.default_rng(11)
    for _ in range(30):
        truth = data.sample_form(rng, form)
        img = data.render(truth)
        o = truth.objects[0]
        if field == "colour":
            new = next(c for c in data.allowed_colours(truth.background)
                       if c not in {x.colour for x in truth.objects})
            asked = dataclasses.replace(truth, objects=tuple(dataclasses.replace(x, colour=new) if x.colour == o.colour else x
                                                             for x in truth.objects))
        else:
            new = next(s for s in data.SHAPES if s != o.shape)
            asked = _swap(truth, shape=new) if form == "relation" else dataclasses.replace(
                truth, objects=tuple(dataclasses.replace(x, shape=new) for x in truth.objects))
        res = checker.check(img, asked)
        assert not res.ok and not getattr(res, f"{field}_ok"), (form, field)


def test_checker_rejects_a_wrong_position():
    rng = np.random.default_rng(13)
    for _ in range(60):
        truth = data.sample_form(rng, "one_placed")
        asked = dataclasses.replace(truth, position=next(p for p in data.POSITIONS if p != truth.position))
        res = checker.check(data.render(truth), asked)
        assert res.colour_ok and res.shape_ok and not res.position_ok and not res.ok


def test_checker_judges_relations_both_ways():
    rng = np.random.default_rng(5)
    for _ in range(60):
        truth = data.sample_form(rng, "relation")
        img = data.render(truth)
        assert checker.check(img, truth).ok
        res = checker.check(img, dataclasses.replace(truth, relation=FLIP[truth.relation]))
        assert res.colour_ok and res.shape_ok and not res.position_ok and not res.ok


@pytest.mark.parametrize("drawn, asked", [(2, 3), (3, 2), (1, 2), (2, 1), (3, 1)])
def test_checker_counts_the_objects(drawn, asked):
    rng = np.random.default_rng(17)
    forms = {1: "one_unplaced", 2: "two_of_a_kind", 3: "three_of_a_kind"}
    for _ in range(30):
        truth = data.sample_form(rng, forms[drawn])
        o = truth.objects[0]
        want = data.sample_form(rng, forms[asked])
        want = dataclasses.replace(want, background=truth.background, objects=tuple(
            dataclasses.replace(x, colour=o.colour, shape=o.shape) for x in want.objects))
        res = checker.check(data.render(truth), want)
        assert not res.count_ok and not res.ok and res.counts == {o.colour: drawn}


def test_checker_cannot_see_an_object_of_the_background_colour():
    scene = data.parse_prompt("a white square on the left")
    res = checker.check(np.full((32, 32, 3), 245 / 255, dtype=np.float32), scene)
    assert not res.colour_ok and not res.ok and res.background == "white"


def test_checker_reports_missing_object_on_blank_image():
    _, scene = data.eval_set(1)[0]
    blank = np.full((32, 32, 3), 0.5, dtype=np.float32)
    res = checker.check(blank, scene)
    assert not res.colour_ok and not res.ok and not res.edge.clean


def test_checker_rejects_non_rgb_input():
    with pytest.raises(ValueError, match="RGB"):
        checker.check(np.zeros((32, 32)), data.eval_set(1)[0][1])


# ---- the edge measure: clean drawings against ragged and bleeding ones


def _mask(scene: data.Scene) -> np.ndarray:
    return np.any([data._coverage(o, 32, 4) >= 0.5 for o in scene.objects], axis=0)


def _paint(scene: data.Scene, mask: np.ndarray, colour: str) -> np.ndarray:
    img = data.render(scene)
    img[mask] = np.asarray(data.COLOURS[colour], dtype=np.float32) / 255
    return img


def _ragged(scene, rng):
    """Serrated outline: every other pixel just outside the shape filled, just inside emptied."""
    inside = _mask(scene)
    comb = (np.add.outer(np.arange(32), np.arange(32)) % 2).astype(bool)
    ring_out = checker._dilate(inside) & ~inside
    ring_in = inside & checker._dilate(~inside)
    img = _paint(scene, ring_out & comb & (rng.random((32, 32)) < 0.8), scene.objects[0].colour)
    bg = np.asarray(data.BACKGROUNDS[scene.background], dtype=np.float32) / 255
    img[ring_in & ~comb & (rng.random((32, 32)) < 0.8)] = bg
    return img


def _streak(scene, rng):
    """The shape runs out to the frame: a 3-pixel band from its centre to the nearest side."""
    o = scene.objects[0]
    m = np.zeros((32, 32), dtype=bool)
    y, x = int(o.y), int(o.x)
    side = int(np.argmin([x, 31 - x, y, 31 - y]))
    if side == 0:
        m[y - 1:y + 2, :x] = True
    elif side == 1:
        m[y - 1:y + 2, x:] = True
    elif side == 2:
        m[:y, x - 1:x + 2] = True
    else:
        m[y:, x - 1:x + 2] = True
    return _paint(scene, m, o.colour)


def _halo(scene, rng):
    """Colour bleeding into the background: a faint ring of mixed colour around the shape."""
    img = data.render(scene)
    inside = _mask(scene)
    grown = checker._dilate(checker._dilate(checker._dilate(inside)))
    ring = grown & ~checker._dilate(inside)
    col = np.asarray(data.COLOURS[scene.objects[0].colour], dtype=np.float32) / 255
    img[ring] = 0.5 * img[ring] + 0.5 * col
    return img


def _speckles(scene, rng):
    """Specks of the object's colour scattered over the background, too small to be objects."""
    far = ~checker._dilate(checker._dilate(_mask(scene)))
    return _paint(scene, far & (rng.random((32, 32)) < 0.03), scene.objects[0].colour)


@pytest.mark.parametrize("spoil, measure", [(_ragged, "roughness"), (_streak, "touches_frame"),
                                            (_halo, "stray_px"), (_speckles, "stray_px")])
def test_edge_measure_separates_clean_from_ragged_or_bleeding(spoil, measure):
    rng = np.random.default_rng(23)
    for form in ("one_placed", "one_unplaced", "one_black_white"):
        for _ in range(25):
            scene = data.sample_form(rng, form)
            clean = checker.check(data.render(scene), scene).edge
            bad = checker.check(spoil(scene, rng), scene).edge
            assert clean.clean and not bad.clean, (form, spoil.__name__, clean, bad)
            if measure == "roughness":
                assert bad.roughness >= clean.roughness + 0.1
            elif measure == "touches_frame":
                assert bad.touches_frame and not clean.touches_frame
            else:
                assert bad.stray_px > checker.CLEAN_STRAY >= clean.stray_px


def test_summary_reports_every_form_and_group():
    items = data.eval_set(60)
    scenes = [s for _, s in items]
    results = [checker.check(data.render(s), s) for s in scenes]
    # Spoil every relation: the relation group drops to 0, the others stay at 100.
    results = [checker.check(data.render(s), dataclasses.replace(s, relation=FLIP[s.relation]))
               if s.relation else r for r, s in zip(results, scenes)]
    summary = checker.summarise(results, scenes)
    assert summary["forms"]["relation"]["adherence"] == 0.0 == summary["adherence_pair"]
    assert summary["groups"]["one_object"]["adherence"] == 100.0 == summary["adherence_single"]
    assert summary["groups"]["count"]["adherence"] == 100.0
    assert summary["forms"]["relation"]["n"] + summary["groups"]["one_object"]["n"] + summary["groups"]["count"]["n"] == 60


def test_checker_cli_on_the_ground_truth(capsys):
    assert checker.main(["--ground-truth", "-n", "60", "--json"]) == 0
    import json

    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 60 and summary["adherence"] == 100.0 and set(summary["forms"]) == set(data.FORMS)
    with pytest.raises(SystemExit):
        checker.main(["--ground-truth", "--forms", "hexagon"])


def test_checker_cli_draws_a_held_out_prompt_set_from_another_seed(capsys, monkeypatch):
    asked = []
    real = data.eval_set

    def eval_set(n, seed=data.EVAL_SEED, forms=data.FORMS):
        asked.append(seed)
        return real(n, seed=seed, forms=forms)

    monkeypatch.setattr(data, "eval_set", eval_set)
    assert checker.main(["--ground-truth", "-n", "12", "--prompt-seed", "7", "--json"]) == 0
    import json

    summary = json.loads(capsys.readouterr().out)
    assert asked == [7] and summary["prompt_seed"] == 7 and summary["n"] == 12 and summary["adherence"] == 100.0
    assert [t for t, _ in real(12, seed=7)] != [t for t, _ in real(12)]


def test_tokenizer_handles_any_text():
    from clusca_shapes.text import WordTokenizer

    tok = WordTokenizer(data.vocabulary(), max_length=16)
    ids, mask = tok(["", "a red circle", "zzz ☃ 漢字 !!!", "red " * 100, "two blue squares"])
    assert ids.shape == (5, 16) and mask.shape == (5, 16)
    assert mask[0].sum() == 1  # only <bos>
    assert ids[1, 1] == tok.stoi["a"] and ids[1, 2] == tok.stoi["red"]
    assert mask[2].sum() == 1 + 2  # 'zzz' and '漢字' are unknown; symbols are dropped
    assert (ids[2, 1:3] == tok.stoi["<unk>"]).all()
    assert mask[3].all()  # truncated, not rejected
    assert ids[4, 1:4].tolist() == [tok.stoi["two"], tok.stoi["blue"], tok.stoi["square"]]
    with pytest.raises(ValueError, match="string"):
        tok([None])


def test_shipped_vocabulary_knows_every_word_of_the_data_and_reads_plurals():
    from clusca_shapes import WEIGHTS_DIR
    from clusca_shapes.text import WordTokenizer

    shipped = WordTokenizer.from_pretrained(WEIGHTS_DIR / "tokenizer")
    assert set(data.vocabulary()) <= set(shipped.itos)
    ids, _ = shipped(["two blue squares"])
    assert ids[0, 1:4].tolist() == [shipped.stoi["two"], shipped.stoi["blue"], shipped.stoi["square"]]
