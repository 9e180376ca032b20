"""Mask-aware ClusCa for inpainting: the mask's tokens are clustered apart, get most fresh tokens,
and never receive values propagated from outside; unmasked samples are clustered as plain ClusCa."""

from __future__ import annotations

import pytest
import torch

from clusca import ClusCaConfig, apply_clusca, clusca_run, remove_clusca, run_state
from clusca.masking import check_masks, masked_clusters, on_token_grid
from clusca.testing import euler_sample, tiny_flux

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIDE = 8  # tiny FLUX: 64 image tokens on an 8 x 8 grid
STEPS = 10
FF = "transformer_blocks.0.ff"


def box_mask(top: int, left: int, h: int, w: int) -> torch.Tensor:
    """A (SIDE, SIDE) token-grid mask, True inside the box."""
    m = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    m[top:top + h, left:left + w] = True
    return m


def cfg(**kw) -> ClusCaConfig:
    return ClusCaConfig.preset("balanced", interval=4, **kw)


@pytest.fixture
def case():
    c = tiny_flux(side=SIDE)
    yield c
    remove_clusca(c.model)


def sample(case, x, seeds, config, masks=None, lean=True):
    apply_clusca(case.model, lean=lean)
    with torch.no_grad(), clusca_run(case.model, config, num_inference_steps=STEPS) as run:
        if masks is not None:
            run.set_token_mask(masks)
        return euler_sample(case, x, STEPS, seeds)


def test_the_mask_gets_at_least_its_share_of_the_clusters():
    assert masked_clusters(16, 64, 16, 0.75) == 12
    assert masked_clusters(48, 64, 16, 0.5) == 12  # more than the share where the mask is larger
    assert masked_clusters(5, 64, 16, 0.75) == 5  # never more clusters than tokens
    assert masked_clusters(63, 64, 16, 1.0) == 15  # the kept tokens keep one
    assert masked_clusters(0, 64, 16, 0.75) is None and masked_clusters(64, 64, 16, 0.75) is None
    assert masked_clusters(16, 64, 16, 0.0) is None


def test_a_spatial_mask_is_pooled_onto_the_token_grid():
    pixels = torch.zeros(32, 64)
    pixels[0:3, 60:64] = 1  # touches one 4 x 4 cell of an 8 x 16 grid
    grid = on_token_grid(check_masks(pixels[None])[0], 128)
    assert grid.shape == (128,) and grid.sum() == 1 and grid[15]
    assert on_token_grid(check_masks(pixels[None])[0], 100) is None  # no grid of that aspect: ignored
    with pytest.raises(ValueError, match="token mask"):
        check_masks(torch.zeros(4))


def test_clusters_never_mix_the_mask_and_the_rest_and_fresh_tokens_prefer_the_mask(case):
    masks = [box_mask(0, 0, 4, 4).reshape(-1), box_mask(2, 3, 5, 5).reshape(-1)]
    apply_clusca(case.model, lean=False)  # the module hooks: the lean cached step never calls the module
    state = run_state(case.model)
    seen = []

    def check(mod, inputs, output):
        c = state.clusters("image")
        if state.full or c is None:
            return
        rows = state.fresh_rows(FF)
        for b, m in enumerate(masks):
            inside, outside = set(c.assign[b][m].tolist()), set(c.assign[b][~m].tolist())
            assert not inside & outside
            assert len(inside) >= 12
            tokens = rows[(rows // (SIDE * SIDE)) == b] % (SIDE * SIDE)
            seen.append(m[tokens].float().mean().item())

    handle = case.model.transformer_blocks[0].ff.register_forward_hook(check)
    with torch.no_grad(), clusca_run(case.model, cfg(clusters=16), num_inference_steps=STEPS) as run:
        run.set_token_mask(torch.stack(masks))
        euler_sample(case, case.latents(2, seed=1), STEPS, [1, 2])
    handle.remove()
    # 16 fresh tokens per layer, 12 or more of them in masks of 16 and 25 of the 64 tokens.
    assert seen and min(seen) >= 0.75


@pytest.mark.parametrize("share", [0.75, 0.0])
def test_masked_tokens_never_receive_values_propagated_from_outside(case, share):
    """Fresh outputs of kept tokens are poisoned on cached steps; with full propagation
    (gamma 1) each token's factor becomes its cluster's fresh mean. No poison may reach the mask."""
    mask = box_mask(2, 2, 4, 5).reshape(-1)
    n = SIDE * SIDE
    apply_clusca(case.model, lean=False)
    state = run_state(case.model)
    ff = case.model.transformer_blocks[0].ff
    reached = []

    def poison(mod, inputs, output):
        if state.full or inputs[0].shape[1] == n:
            return None
        rows = state.fresh_rows(FF)
        out = output.clone()
        flat = out.view(-1, out.shape[-1])
        flat[~mask[rows % n]] += 1e4
        return out

    def after(mod, inputs, output):
        if not state.full and state.fresh_rows(FF) is not None:
            f0 = state.factors(FF)[0].reshape(-1, n, output.shape[-1])
            reached.append(f0[:, mask].abs().max().item())

    handles = [ff.net[-1].register_forward_hook(poison), ff.register_forward_hook(after)]
    with torch.no_grad(), clusca_run(case.model, cfg(clusters=8, gamma=1.0, mask_share=share),
                                     num_inference_steps=STEPS) as run:
        run.set_token_mask(mask[None])
        euler_sample(case, case.latents(1, seed=3), STEPS, [3])
    for h in handles:
        h.remove()
    assert reached
    if share > 0:
        assert max(reached) < 1e3
    else:
        assert max(reached) > 1e3  # plain ClusCa propagates across the mask's edge


def test_a_mixed_batch_with_and_without_masks_equals_its_solo_runs(case):
    seeds = [11, 4, 29]
    masks = [box_mask(0, 0, 3, 8), None, box_mask(4, 2, 4, 4)]
    x = torch.cat([case.latents(1, seed=s) for s in seeds])
    config = cfg(clusters=16, gamma=0.2)
    base_noise = (euler_sample(case, x, STEPS, seeds)[1] - euler_sample(case, x[1:2], STEPS, [4])[0]).abs().max().item()
    mixed = sample(case, x, seeds, config, masks)
    for k, s in enumerate(seeds):
        alone = sample(case, x[k:k + 1], [s], config, [masks[k]])[0]
        assert (mixed[k] - alone).abs().max().item() <= max(1e-5, 20 * base_noise), k
    plain = sample(case, x, seeds, config)
    # The sample without a mask is clustered as plain ClusCa; the masked ones are not.
    assert (mixed[1] - plain[1]).abs().max().item() <= max(1e-5, 20 * base_noise)
    assert (mixed[0] - plain[0]).abs().max() > 1e-4 and (mixed[2] - plain[2]).abs().max() > 1e-4


def test_a_mask_of_every_token_or_none_or_share_zero_is_plain_clusca(case):
    x = case.latents(1, seed=5)
    config = cfg(clusters=16, gamma=0.2)
    plain = sample(case, x, [5], config)
    half = box_mask(0, 0, 4, 8)[None]
    assert torch.equal(sample(case, x, [5], config, torch.ones(1, SIDE, SIDE)), plain)
    assert torch.equal(sample(case, x, [5], config, torch.zeros(1, SIDE * SIDE)), plain)
    assert torch.equal(sample(case, x, [5], cfg(clusters=16, gamma=0.2, mask_share=0.0), half), plain)
    assert not torch.equal(sample(case, x, [5], config, half), plain)
