"""Batch assembly without Redis or a model: grouping, cutting into calls, handing back outputs."""

from __future__ import annotations

from clusca.config import ClusCaConfig
from service.contract import JobRequest
from service.worker.batching import group_by_batch_key, shares, split_into_calls, video_pixels
from service.worker.runners import Batch


def _req(prompt="a", *, n=1, steps=4, size=32, cache=None, frames=None, seed=0, negative=None):
    return JobRequest(prompt, size, size, steps, 3.5, seed, num_images=n, cache=ClusCaConfig.from_dict(cache), num_frames=frames,
                      negative_prompt=negative)


def test_groups_follow_the_batch_key_in_arrival_order():
    reqs = [_req("a"), _req("b", steps=8), _req("c", n=3, seed=9), _req("d", cache={"mode": "fora"}), _req("e", steps=8)]
    groups = group_by_batch_key(list("abcde"), ["m"] * 5, reqs)
    assert groups == [["a", "c"], ["b", "e"], ["d"]]


def test_the_same_settings_on_two_models_never_share_a_group():
    assert group_by_batch_key([1, 2], ["m1", "m2"], [_req(), _req()]) == [[1], [2]]


def test_an_unreadable_request_stays_alone():
    assert group_by_batch_key([1, 2, 3], ["m"] * 3, [None, _req(), None]) == [[1], [2], [3]]


def test_calls_hold_at_most_the_image_cap_and_a_big_job_runs_alone():
    reqs = [_req(n=2), _req(n=2), _req(n=1), _req(n=9), _req(n=1)]
    calls = split_into_calls(list("abcde"), reqs, max_images=4, max_video_pixels=None)
    assert calls == [["a", "b"], ["c"], ["d"], ["e"]]


def test_video_calls_hold_at_most_the_model_pixel_cap():
    reqs = [_req(frames=5, size=8), _req(frames=5, size=8), _req(frames=5, size=8)]
    assert video_pixels(reqs[0]) == 8 * 8 * 5
    calls = split_into_calls([0, 1, 2], reqs, max_images=16, max_video_pixels=2 * 8 * 8 * 5)
    assert calls == [[0, 1], [2]]


def test_shares_hand_each_job_its_own_images_in_order():
    reqs = [_req(n=2), _req(n=1), _req(n=3)]
    assert shares(reqs, list(range(6))) == [[0, 1], [2], [3, 4, 5]]


def test_a_batch_carries_one_prompt_and_seed_per_image():
    reqs = [_req("a", n=2, seed=10), _req("b", n=1, seed=3)]
    batch = Batch.of(reqs)
    assert batch.prompts == ["a", "a", "b"] and batch.seeds == [10, 11, 3] and batch.images == 3
    assert batch.negative_prompts is None
    with_negative = Batch.of([_req("a", negative="x"), _req("b", negative="")])
    assert with_negative.negative_prompts == ["x", ""]
