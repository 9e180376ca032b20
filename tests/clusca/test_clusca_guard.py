"""The divergence guard: a cached step expected to depart too far from the last fresh output
runs in full, which keeps the built-in model's collapse case (the paper's `fast` settings on
one prompt and seed gave an all-black image) close to the uncached image."""

from __future__ import annotations

import pytest
import torch

from clusca import ClusCaConfig, apply_clusca, clusca_run
from clusca.config import ClusCaConfigError, parse_settings
from clusca.quality import psnr
from clusca_shapes import WEIGHTS_DIR, ShapesFluxPipeline

COLLAPSE_PROMPT = "a black square on the right on a white background"
COLLAPSE_SEED = 11
PAPER_FAST = {"order": 1, "interval": 6, "clusters": 16, "gamma": 0.007}


@pytest.fixture(scope="module")
def pipe():
    p = ShapesFluxPipeline.from_pretrained(WEIGHTS_DIR)
    apply_clusca(p.transformer)
    return p


def _image(pipe, cfg: ClusCaConfig, seed: int = COLLAPSE_SEED):
    with torch.inference_mode(), clusca_run(pipe.transformer, cfg) as run:
        image = pipe(COLLAPSE_PROMPT, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
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


def test_guard_knobs_are_validated_and_parsed():
    assert ClusCaConfig().guard is False  # off by default: a trip is full for the whole batch
    assert parse_settings("guard=false,guard_bound=0.5") == {"guard": False, "guard_bound": 0.5}
    for bad in ({"guard_bound": 0}, {"guard_bound": -1.0}, {"guard": "yes"}):
        with pytest.raises(ClusCaConfigError) as exc:
            ClusCaConfig.from_dict(bad)
        assert exc.value.field == next(iter(bad))
