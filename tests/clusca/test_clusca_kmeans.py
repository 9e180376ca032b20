"""Batched k-means: agreement with scikit-learn, per-sample independence, warm start."""

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from clusca.kmeans import kmeans


def blobs(k: int, per: int, dim: int, seed: int, spread: float = 0.05) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, dim, generator=g) * 3.0
    labels = torch.arange(k).repeat_interleave(per)
    x = centers[labels] + spread * torch.randn(k * per, dim, generator=g)
    perm = torch.randperm(k * per, generator=g)
    return x[perm], labels[perm].numpy()


@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_same_partition_as_sklearn_on_separable_blobs(distance):
    xs, truths = zip(*(blobs(6, 40, 16, seed) for seed in range(3)))
    x = torch.stack(xs)  # three samples clustered in one batched call
    assign, centroids = kmeans(x, 6, iters=30, distance=distance, seed=1)
    assert assign.shape == (3, 240) and centroids.shape == (3, 6, 16)
    for b in range(3):
        ref = KMeans(n_clusters=6, n_init=10, random_state=0).fit_predict(x[b].numpy())
        assert adjusted_rand_score(ref, assign[b].numpy()) == pytest.approx(1.0)
        assert adjusted_rand_score(truths[b], assign[b].numpy()) == pytest.approx(1.0)


def test_fitting_on_a_token_subset_gives_the_same_partition():
    x, truth = blobs(6, 60, 16, seed=7)
    full, _ = kmeans(x[None], 6, iters=30, seed=1)
    sub, c = kmeans(x[None], 6, iters=30, seed=1, fit_tokens=96)
    assert sub.shape == (1, 360) and c.shape == (1, 6, 16)
    assert adjusted_rand_score(full[0].numpy(), sub[0].numpy()) == pytest.approx(1.0)
    assert adjusted_rand_score(truth, sub[0].numpy()) == pytest.approx(1.0)


def test_each_sample_is_clustered_independently_of_its_batch():
    a, _ = blobs(4, 30, 8, seed=10)
    b, _ = blobs(4, 30, 8, seed=11)
    for fit in (0, 64):
        alone, c_alone = kmeans(a[None], 4, seed=5, fit_tokens=fit)
        batched, c_batched = kmeans(torch.stack([b, a]), 4, seed=5, fit_tokens=fit)
        assert torch.equal(alone[0], batched[1])
        torch.testing.assert_close(c_alone[0], c_batched[1])


def test_early_stop_is_per_sample():
    # Structureless noise needs many rounds, blobs very few: batching them together must
    # not change either result.
    noise = torch.randn(120, 8, generator=torch.Generator().manual_seed(0))
    easy, _ = blobs(4, 30, 8, seed=12)
    a_alone, _, r_noise = kmeans(noise[None], 4, iters=10, seed=2, return_rounds=True)
    b_alone, _, r_easy = kmeans(easy[None], 4, iters=10, seed=2, return_rounds=True)
    both, _, r_both = kmeans(torch.stack([noise, easy]), 4, iters=10, seed=2, return_rounds=True)
    assert r_easy < r_noise == r_both
    assert torch.equal(both[0], a_alone[0]) and torch.equal(both[1], b_alone[0])


def test_warm_start_converges_immediately_and_keeps_labels():
    x, _ = blobs(5, 20, 8, seed=3)
    assign, c = kmeans(x[None], 5, iters=20, seed=0)
    again, c2 = kmeans(x[None], 5, iters=1, init=c)
    assert torch.equal(assign, again)
    torch.testing.assert_close(c, c2)


def test_k_is_clamped_to_the_number_of_tokens_and_empty_clusters_keep_centroids():
    x = torch.randn(2, 5, 4)
    assign, c = kmeans(x, 16)
    assert c.shape == (2, 5, 4)
    assert int(assign.max()) < 5
    # All tokens identical: every cluster but one ends up empty and must stay finite.
    same = torch.ones(1, 10, 3)
    init = torch.randn(1, 3, 3)
    init[0, 0] = 1.0
    assign, c = kmeans(same, 3, init=init)
    assert torch.isfinite(c).all()
    assert torch.equal(assign, torch.zeros(1, 10, dtype=torch.long))


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="^x:"):
        kmeans(torch.randn(4, 3), 2)
    with pytest.raises(ValueError, match="^distance:"):
        kmeans(torch.randn(1, 4, 3), 2, distance="cosine")
