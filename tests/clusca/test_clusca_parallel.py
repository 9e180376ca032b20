"""Context parallelism (clusca.parallel): Ulysses-2 on gloo over two spawned CPU processes
against the same calls in one process, with the cache's decisions agreed across the ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clusca import parallel as cp
from clusca.quality import psnr
from tests.clusca import cp_ranks


@pytest.fixture(scope="module")
def builtin_runs():
    torch.manual_seed(0)
    one = cp_ranks.builtin_images(1)
    two = cp_ranks.spawn(2, cp_ranks.rank_main, "builtin")
    return one, two


@pytest.mark.parametrize("mode", ["off", "fora", "taylorseer"])
def test_ulysses2_equals_one_rank(builtin_runs, mode):
    one, (rank0, rank1) = builtin_runs
    assert np.abs(rank0[mode]["images"] - one[mode]["images"]).max() < 1e-4
    # The gathered output is the same bytes on every rank.
    assert np.array_equal(rank0[mode]["images"], rank1[mode]["images"])
    assert rank0[mode]["stats"]["full_steps"] == one[mode]["stats"]["full_steps"]


def test_clusca_psnr_within_half_a_db_of_one_rank(builtin_runs):
    one, (rank0, _) = builtin_runs
    ref_one, ref_two = one["off"]["images"], rank0["off"]["images"]
    single = psnr(ref_one, one["clusca"]["images"])
    split = psnr(ref_two, rank0["clusca"]["images"])
    assert split > single - 0.5, (single, split)
    assert rank0["clusca"]["stats"]["cached_steps"] == one["clusca"]["stats"]["cached_steps"] > 0


def test_every_rank_makes_the_same_decisions(builtin_runs):
    _, (rank0, rank1) = builtin_runs
    for name in cp_ranks.configs():
        s0, s1 = rank0[name]["stats"], rank1[name]["stats"]
        for key in ("full_steps", "cached_steps", "guard_trips", "tokens_computed"):
            assert s0[key] == s1[key], (name, key)
    # The strict guard bound trips on some steps, on both ranks alike.
    assert rank0["clusca_guard"]["stats"]["guard_trips"] > 0


def test_collective_time_is_measured(builtin_runs):
    _, (rank0, _) = builtin_runs
    off, cached = rank0["off"], rank0["clusca"]
    assert off["collective_s"] > 0 and off["collectives"] > 0
    # Cached steps skip attention: only the output gather remains.
    assert cached["collectives"] < off["collectives"]


def test_tiny_flux_ulysses2_equals_one_rank():
    torch.manual_seed(0)
    one = cp_ranks.tiny_flux_outputs(1)
    two, _ = cp_ranks.spawn(2, cp_ranks.rank_main, "tiny_flux")
    for a, b in zip(one, two):
        assert (a - b).abs().max().item() < 1e-4


def test_degree_that_does_not_divide_the_heads_is_refused():
    with pytest.raises(ValueError, match="does not divide the model's 6 attention heads"):
        cp.check_degree(cp.ParallelDegree(ulysses=4), heads=6)
    with pytest.raises(ValueError, match="do not divide the 10 image tokens"):
        cp.check_degree(cp.ParallelDegree(ulysses=2, ring=2), heads=8, tokens={"image": 10})
    cp.check_degree(cp.ParallelDegree(ulysses=2), heads=6, tokens={"image": 64})


def test_enable_without_a_process_group_is_refused():
    from clusca_shapes.model import build_transformer

    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        cp.enable_context_parallel(build_transformer(), cp.ParallelDegree(ulysses=2))


def test_ring_on_the_native_attention_backend_is_refused_before_any_call():
    from clusca_shapes.model import build_transformer

    model = build_transformer()
    assert cp.attention_backend(model) == "native"
    with pytest.raises(ValueError, match="ring attention needs an attention backend that returns the log-sum-exp"):
        cp.enable_context_parallel(model, cp.ParallelDegree(ulysses=1, ring=2))
