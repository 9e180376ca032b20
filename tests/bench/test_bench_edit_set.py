"""The edit set's docs section and headline rows come from its results dict alone; its edits are
well formed and the checker tells a right edit from a wrong one."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import edit_set  # noqa: E402
from tests.bench.test_bench_sections import render_via_report  # noqa: E402


def _variant(pct: float, kept: float, inside: float) -> dict:
    return {"follows": [True], "follows_pct": pct, "kept_psnr": [kept], "min_kept_psnr": kept,
            "inside_psnr": [inside], "mean_inside_psnr": inside}


RES = {"command": "python benchmarks/edit_set.py --edits 3", "machine": "testarch CPU, 7 cores", "date": "2031-01-02",
       "torch": "9.9", "steps": 17, "quality_s": 1.0,
       "edits": [{"base": "a teal dodecagon on the left", "prompt": "a mauve blob on the left", "box": [0, 0, 20, 32],
                  "position": "left"}],
       "default_cache": {"mode": "clusca", "interval": 4, "mask_share": 0.75},
       "variants": {"uncached": _variant(91.5, 100.0, 100.0), "default": _variant(89.5, 99.0, 36.25),
                    "plain": _variant(88.0, 98.5, 36.0), "strong aware": _variant(90.0, 99.0, 33.5),
                    "strong plain": _variant(89.0, 99.0, 33.0)},
       "latency": {"steps": 40, "strength": 0.5, "denoised": 20, "repeats": 3, "times": {},
                   "median_s": {"edit uncached": 0.6, "t2i uncached": 0.5, "edit default": 0.3, "t2i default": 0.25},
                   "median_cpu_s": {"edit uncached": 0.5, "t2i uncached": 0.4, "edit default": 0.25, "t2i default": 0.2},
                   "edit_over_t2i_uncached": 1.25, "edit_over_t2i_cached": 1.125,
                   "wall_edit_over_t2i_uncached": 1.2, "wall_edit_over_t2i_cached": 1.2}}


def test_section_and_headline_are_rendered_from_the_results(tmp_path):
    text = render_via_report(RES, tmp_path, "edit_set.json")
    for s in ("2031-01-02", "testarch CPU, 7 cores", "a teal dodecagon on the left", "17 steps",
              "| default | 89.5 | 99.0 | 36.25 |", "| plain | 88.0 | 98.5 | 36.00 |", "mask_share 0.75",
              "| uncached | 500 (600) | 400 (500) | 1.250 (1.200) |", "| default | 250 (300) | 200 (250) | 1.125 (1.200) |",
              "+0.25 dB", "(met: 91.5%)", "(met: +2.0)", "| strong plain | 89.0 | 99.0 | 33.00 |",
              "+0.50 dB at the strong setting"):
        assert s in text, s
    rows = edit_set.headline(RES)
    assert {r.date for r in rows} == {"2031-01-02"} and {r.on for r in rows} == {"testarch CPU, 7 cores"}
    quality, latency = rows
    assert "91.5%" in quality.figure and "+2.0 points" in quality.figure and "98.5 dB" in quality.figure
    assert "+0.25 dB" in quality.figure and "+0.50 dB at K16 g0.2" in quality.figure
    assert "1.25x" in latency.figure and "1.12x cached" in latency.figure


def test_the_edits_ask_for_another_object_where_the_mask_is():
    from clusca_shapes.evaluation import MASK_BOXES, edit_set as edits_of
    from clusca_shapes.tools import data

    edits, follows = edits_of(6)
    assert len(edits) == 6
    for k, e in enumerate(edits):
        assert e["box"] == MASK_BOXES[e["position"]] and e["base"] != e["prompt"]
        target = data.parse_prompt(e["prompt"])
        base = data.parse_prompt(e["base"])
        assert target.position == base.position == e["position"] and target.background == base.background
        new, old = target.objects[0], base.objects[0]
        assert new.colour != old.colour and new.shape != old.shape
        # The checker judges the edit: the scene asked for, drawn, follows; the base scene does not.
        drawn = data.render(data.Scene(target.background, (data.SceneObject(new.shape, new.colour, *_anchor(e), 8.0),),
                                       position=target.position))
        assert follows(drawn, k)
        other = data.render(data.Scene(base.background, (data.SceneObject(old.shape, old.colour, *_anchor(e), 8.0),),
                                       position=base.position))
        assert not follows(other, k)


def _anchor(edit: dict) -> tuple[float, float]:
    from clusca_shapes.tools.data import ANCHORS

    return ANCHORS[edit["position"]]
