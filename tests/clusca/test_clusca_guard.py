"""The divergence guard: a sample whose cached step errs too far (measured at ClusCa's fresh
tokens, estimated for the other modes) is computed in full for that step, which keeps the
built-in model's collapse case (the paper's `fast` settings on one prompt and seed gave an
all-black image) close to the uncached image; its batch mates keep their cached step."""

from __future__ import annotations

import pytest
import torch

from clusca import ClusCaConfig, apply_clusca, clusca_run
from clusca.config import ClusCaConfigError, parse_settings
from clusca.quality import psnr
from clusca_shapes import WEIGHTS_DIR, ShapesFluxPipeline
from service.registry import builtin_entry

COLLAPSE_PROMPT = "a black square on the right on a white background"
COLLAPSE_SEED = 11
PAPER_FAST = {"order": 1, "interval": 6, "clusters": 16, "gamma": 0.007}


@pytest.fixture(scope="module")
def pipe():
    p = ShapesFluxPipeline.from_pretrained(WEIGHTS_DIR)
    apply_clusca(p.transformer)
    return p


def _image(pipe, cfg: ClusCaConfig, seed: int = COLLAPSE_SEED, prompt: str = COLLAPSE_PROMPT,
           steps: int | None = None):
    with torch.inference_mode(), clusca_run(pipe.transformer, cfg, num_inference_steps=steps) as run:
        image = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    return image, run.stats


@pytest.fixture(scope="module")
def uncached(pipe):
    return _image(pipe, ClusCaConfig(mode="off"))[0]


@pytest.mark.parametrize("mode", ["clusca", "taylorseer"])
def test_collapse_case_stays_close_to_uncached_with_the_guard(pipe, uncached, mode):
    guarded, stats = _image(pipe, ClusCaConfig(mode=mode, guard=True, **PAPER_FAST))
    assert psnr(guarded, uncached) >= 15.0
    assert stats.guard_trips > 0
    assert stats.to_dict()["guard_trips"] == stats.guard_trips
    # Trips are steps computed in full: they count among the full steps, and some stay cached.
    schedule = len(ClusCaConfig(mode=mode, **PAPER_FAST).full_steps(pipe.default_steps))
    assert stats.full_steps == schedule + stats.guard_trips
    assert stats.cached_steps == pipe.default_steps - stats.full_steps > 0


@pytest.mark.parametrize("mode", ["clusca", "taylorseer"])
def test_collapse_case_without_the_guard_collapses_and_counts_no_trips(pipe, uncached, mode):
    image, stats = _image(pipe, ClusCaConfig(mode=mode, guard=False, **PAPER_FAST))
    assert psnr(image, uncached) < 5.0  # the failure the guard exists for: an all-black image
    assert stats.guard_trips == 0
    assert stats.to_dict()["guard_trips"] == 0
    assert stats.full_steps == len(ClusCaConfig(mode=mode, **PAPER_FAST).full_steps(pipe.default_steps))


def test_a_bound_no_step_reaches_gives_the_unguarded_image(pipe):
    off, _ = _image(pipe, ClusCaConfig(**PAPER_FAST, guard=False), seed=12)
    loose, stats = _image(pipe, ClusCaConfig(**PAPER_FAST, guard=True, guard_bound=100.0), seed=12)
    assert stats.guard_trips == 0
    assert (off == loose).all()


def test_a_tighter_bound_trips_more(pipe):
    trips = [_image(pipe, ClusCaConfig(**PAPER_FAST, guard=True, guard_bound=b), seed=12)[1].guard_trips
             for b in (1.0, 0.1, 0.02)]
    assert trips[0] <= trips[1] < trips[2]


def test_uncached_and_every_step_full_runs_never_trip(pipe):
    for cfg in (ClusCaConfig(mode="off", guard=True), ClusCaConfig(**{**PAPER_FAST, "interval": 1, "guard": True})):
        assert _image(pipe, cfg)[1].guard_trips == 0


def _batch(pipe, cfg: ClusCaConfig, prompts: list[str], seeds: list[int]):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.inference_mode(), clusca_run(pipe.transformer, cfg) as run:
        images = pipe(prompts, generator=gens, output_type="np").images
    return images, run.stats


# With TaylorSeer at interval 6 the collapse case trips twice and this sample never does, so
# every trip of their batch recomputes one sample and leaves the other's cached step alone.
CALM_PROMPT, CALM_SEED = "a red circle", 12


@pytest.mark.parametrize("mode", ["taylorseer", "clusca"])
def test_a_batch_with_a_tripping_sample_equals_each_solo_run(pipe, mode):
    cfg = ClusCaConfig(mode=mode, guard=True, **PAPER_FAST)
    prompts, seeds = [COLLAPSE_PROMPT, CALM_PROMPT], [COLLAPSE_SEED, CALM_SEED]
    together, stats = _batch(pipe, cfg, prompts, seeds)
    alone = [_batch(pipe, cfg, [p], [s]) for p, s in zip(prompts, seeds)]
    for batched, (solo, _) in zip(together, alone):
        # Float summation order may differ between batch sizes; a shared decision would move
        # the calm sample by far more (it would get the collapse case's full steps).
        assert abs(batched - solo[0]).max() <= 2 / 255
    assert alone[0][1].guard_trips > 0
    if mode == "taylorseer":
        assert alone[1][1].guard_trips == 0
        unguarded = _batch(pipe, ClusCaConfig(mode=mode, guard=False, **PAPER_FAST), [CALM_PROMPT], [CALM_SEED])[0]
        assert (alone[1][0] == unguarded).all()  # never tripped: exactly the unguarded image
        assert stats.guard_trips == alone[0][1].guard_trips  # steps at which the guard recomputed a sample
    assert stats.full_steps == len(cfg.full_steps(pipe.default_steps)) + stats.guard_trips


def test_the_models_presets_nearly_never_trip(pipe):
    entry = builtin_entry(None)
    samples = [("an image of a blue square near the top on a black background", 11), (CALM_PROMPT, 12),
               ("a picture of a white triangle", 11)]
    for preset in ("quality", "balanced", "fast"):
        cfg = ClusCaConfig.from_dict({**entry.cache_config({"preset": preset}).to_dict(), "guard": True})
        trips = [_batch(pipe, cfg, [p], [s])[1].guard_trips for p, s in samples]
        assert sum(trips) <= 1, (preset, trips)


def test_guard_knobs_are_validated_and_parsed():
    assert ClusCaConfig().guard is False  # off by default: the frozen reference images need the fixed schedule
    assert parse_settings("guard=false,guard_bound=0.5") == {"guard": False, "guard_bound": 0.5}
    for bad in ({"guard_bound": 0}, {"guard_bound": -1.0}, {"guard": "yes"}, {"guard_layout": 1.5},
                {"guard_layout": -0.1}):
        with pytest.raises(ClusCaConfigError) as exc:
            ClusCaConfig.from_dict(bad)
        assert exc.value.field == next(iter(bad))


def test_the_halves_of_a_guidance_pair_trip_together_and_other_samples_alone():
    from clusca import guard
    from clusca.state import BranchState

    branch = BranchState(0)
    errors = [0.1, 0.5, 0.2, 0.1]  # (uncond a, uncond b, cond a, cond b)
    assert guard.over(branch, errors, 0.3) == [1]  # four samples of their own
    branch.guard_pairs = True
    assert guard.over(branch, errors, 0.3) == [1, 3]  # image b, both halves
    assert guard.over(branch, errors, 0.15) == [0, 1, 2, 3]
    assert guard.over(branch, None, 0.3) == []


# A sample on a knife's edge: its cached steps err no more than its peers', yet caching step 3
# or 4 of 40 sends it to another image; only the guard's layout window (full steps there) saves it.
KNIFE_PROMPT, KNIFE_SEED = "a yellow circle to the left", 11
# The built-in model's `balanced` before its warm-up was five steps: steps 3-5 cached.
WARMUP_3 = {"mode": "clusca", "interval": 4, "warmup": 3, "order": 0, "clusters": 4, "gamma": 0.0}


def test_layout_window_is_a_leading_share_of_the_steps():
    from clusca.guard import layout_steps

    assert layout_steps(40, 0.125) == 5
    assert layout_steps(50, 0.125) == 7
    assert layout_steps(8, 0.125) == 1
    assert layout_steps(40, 0.0) == 0
    assert layout_steps(None, 0.125) == 0  # a run that does not know its step count has none


def test_the_layout_window_saves_a_knife_edge_sample(pipe):
    steps = pipe.default_steps
    ref = _image(pipe, ClusCaConfig(mode="off"), KNIFE_SEED, KNIFE_PROMPT, steps)[0]
    off, _ = _image(pipe, ClusCaConfig(**WARMUP_3), KNIFE_SEED, KNIFE_PROMPT, steps)
    assert psnr(off, ref) < 12.0  # another image
    on, stats = _image(pipe, ClusCaConfig(**WARMUP_3, guard=True), KNIFE_SEED, KNIFE_PROMPT, steps)
    assert psnr(on, ref) >= 20.0
    # Steps 3 and 4 were due to be cached: the window ran both in full, counted as trips.
    schedule = ClusCaConfig(**WARMUP_3).full_steps(steps)
    assert {3, 4} - set(schedule) == {3, 4}
    assert stats.guard_trips >= 2 and stats.full_steps == len(schedule) + stats.guard_trips
    # Without the step count, or with no window, the guard has no window: the bound alone acts.
    unknown, st_unknown = _image(pipe, ClusCaConfig(**WARMUP_3, guard=True), KNIFE_SEED, KNIFE_PROMPT)
    none, st_none = _image(pipe, ClusCaConfig(**WARMUP_3, guard=True, guard_layout=0.0), KNIFE_SEED, KNIFE_PROMPT,
                           steps)
    assert (unknown == none).all() and st_unknown.guard_trips == st_none.guard_trips
    assert psnr(none, ref) < 12.0


def test_the_models_presets_keep_the_layout_steps_full(pipe):
    """The built-in model's presets warm up past the guard's window, so it costs them nothing."""
    from clusca.guard import layout_steps

    entry = builtin_entry(None)
    window = layout_steps(pipe.default_steps, ClusCaConfig().guard_layout)
    for preset in ("quality", "balanced", "fast"):
        cfg = entry.cache_config({"preset": preset})
        assert all(cfg.is_full_step(s) for s in range(window)), preset
        guarded = [_image(pipe, ClusCaConfig.from_dict({**cfg.to_dict(), "guard": True, "guard_layout": share}),
                          KNIFE_SEED, KNIFE_PROMPT, pipe.default_steps) for share in (ClusCaConfig().guard_layout, 0.0)]
        (with_window, st), (without, st_without) = guarded
        assert (with_window == without).all() and st.guard_trips == st_without.guard_trips, preset
