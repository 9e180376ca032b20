"""The built-in model's public evaluation door: the fixed prompts and the checker behind them."""

from __future__ import annotations

from clusca_shapes.evaluation import evaluation_prompts
from clusca_shapes.tools import data


def test_each_prompt_is_followed_by_its_own_scene_and_not_by_another():
    prompts, follows = evaluation_prompts(12)
    scenes = [scene for _, scene in data.eval_set(12)]
    assert prompts == [text for text, _ in data.eval_set(12)]
    drawn = [data.render(s) for s in scenes]
    assert all(follows(img, k) for k, img in enumerate(drawn))
    # A scene drawn for one prompt rarely satisfies a different one: most pairs must fail.
    crossed = [follows(drawn[k], (k + 1) % 12) for k in range(12)]
    assert sum(crossed) <= 3, crossed
