"""Data generator, tokenizer and adherence checker of the built-in model (no weights needed)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from clusca_shapes.tools import checker, data


def test_generator_is_deterministic_per_seed():
    a_img, a_cap, _ = data.make_batch(np.random.default_rng(7), 16)
    b_img, b_cap, _ = data.make_batch(np.random.default_rng(7), 16)
    c_img, c_cap, _ = data.make_batch(np.random.default_rng(8), 16)
    assert a_cap == b_cap and np.array_equal(a_img, b_img)
    assert a_cap != c_cap
    assert a_img.shape == (16, 32, 32, 3) and a_img.dtype == np.float32
    assert 0.0 <= a_img.min() and a_img.max() <= 1.0


def test_captions_cover_the_required_vocabulary():
    rng = np.random.default_rng(0)
    scenes = [data.sample_scene(rng) for _ in range(2000)]
    caps = [data.caption(s, rng) for s in scenes]
    assert {o.shape for s in scenes for o in s.objects} == set(data.SHAPES)
    assert len({o.colour for s in scenes for o in s.objects}) >= 6
    assert {s.position for s in scenes} >= set(data.POSITIONS)
    assert {s.relation for s in scenes} >= set(data.RELATIONS)
    assert len({s.background for s in scenes}) == len(data.BACKGROUNDS)
    singles = sum(len(s.objects) == 1 for s in scenes)
    assert 0.6 * len(scenes) < singles < 0.9 * len(scenes)
    vocab = set(data.vocabulary())
    for s, c in zip(scenes, caps):
        assert set(data.split_words(c)) <= vocab, c
        for o in s.objects:
            assert any(w in c for w in data.COLOUR_WORDS[o.colour]), c
            assert any(w in c for w in data.SHAPE_WORDS[o.shape]), c
    assert len(set(caps)) > 500  # wording varies
    assert not any(" a orange" in c or c.startswith("a orange") for c in caps)


def test_pair_scenes_use_distinct_colours():
    rng = np.random.default_rng(3)
    for _ in range(500):
        s = data.sample_scene(rng, pair_fraction=1.0)
        assert len(s.objects) == 2 and s.objects[0].colour != s.objects[1].colour


def test_eval_set_is_fixed_and_fully_specified():
    a, b = data.eval_set(200), data.eval_set(200)
    assert [p for p, _ in a] == [p for p, _ in b]
    assert len(a) == 200
    for _, s in a:
        assert s.position is not None or s.relation is not None


def test_checker_accepts_every_rendered_ground_truth():
    items = data.eval_set(300)
    results = [checker.check(data.render(s), s) for _, s in items]
    summary = checker.summarise(results, [s for _, s in items])
    assert summary["adherence"] == 100.0, summary


def test_checker_is_robust_to_mild_noise_and_uint8_input():
    rng = np.random.default_rng(1)
    for _, s in data.eval_set(60):
        img = np.clip(data.render(s) + rng.normal(0, 0.04, (32, 32, 3)), 0, 1)
        assert checker.check((img * 255).astype(np.uint8), s).ok


def _swap(scene: data.Scene, **changes) -> data.Scene:
    objs = list(scene.objects)
    objs[0] = dataclasses.replace(objs[0], **changes)
    return dataclasses.replace(scene, objects=tuple(objs))


@pytest.mark.parametrize("field", ["colour", "shape", "position"])
def test_checker_rejects_a_wrong_attribute(field):
    rng = np.random.default_rng(11)
    rejected = 0
    for _ in range(60):
        truth = data.sample_scene(rng, pair_fraction=0.0, unplaced_fraction=0.0)
        img = data.render(truth)
        o = truth.objects[0]
        if field == "colour":
            asked = _swap(truth, colour=next(c for c in data.COLOURS if c != o.colour))
        elif field == "shape":
            asked = _swap(truth, shape=next(s for s in data.SHAPES if s != o.shape))
        else:
            asked = dataclasses.replace(truth, position=next(p for p in data.POSITIONS if p != truth.position))
        res = checker.check(img, asked)
        rejected += not res.ok
        assert not getattr(res, f"{field}_ok")
    assert rejected == 60


def test_checker_judges_relations_both_ways():
    rng = np.random.default_rng(5)
    flip = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
    for _ in range(40):
        truth = data.sample_scene(rng, pair_fraction=1.0)
        img = data.render(truth)
        assert checker.check(img, truth).ok
        wrong = dataclasses.replace(truth, relation=flip[truth.relation])
        res = checker.check(img, wrong)
        assert res.colour_ok and res.shape_ok and not res.position_ok


def test_checker_reports_missing_object_on_blank_image():
    _, scene = data.eval_set(1)[0]
    blank = np.full((32, 32, 3), 0.5, dtype=np.float32)
    res = checker.check(blank, scene)
    assert not res.colour_ok and not res.ok


def test_checker_rejects_non_rgb_input():
    with pytest.raises(ValueError, match="RGB"):
        checker.check(np.zeros((32, 32)), data.eval_set(1)[0][1])


def test_tokenizer_handles_any_text():
    from clusca_shapes.text import WordTokenizer

    tok = WordTokenizer(data.vocabulary(), max_length=16)
    ids, mask = tok(["", "a red circle", "zzz ☃ 漢字 !!!", "red " * 100])
    assert ids.shape == (4, 16) and mask.shape == (4, 16)
    assert mask[0].sum() == 1  # only <bos>
    assert ids[1, 1] == tok.stoi["a"] and ids[1, 2] == tok.stoi["red"]
    assert mask[2].sum() == 1 + 2  # 'zzz' and '漢字' are unknown; symbols are dropped
    assert (ids[2, 1:3] == tok.stoi["<unk>"]).all()
    assert mask[3].all()  # truncated, not rejected
    with pytest.raises(ValueError, match="string"):
        tok([None])
