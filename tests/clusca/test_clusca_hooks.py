"""What the feed-forward hook computes on a cached step, checked against the module itself."""

import copy

import pytest
import torch

from clusca import ClusCaConfig, apply_clusca, clusca_run, remove_clusca, run_state
from clusca.fresh import mix
from clusca.testing import euler_sample, tiny_flux, tiny_hunyuan_video, tiny_sd3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_capturing_ff(cfg: ClusCaConfig, steps: int = 6):
    """Run a tiny FLUX loop; on the first cached step capture, for the image FFN of the first
    dual block, its input, the hook's output, the true FFN output, and the fresh rows.

    The module hooks only (``lean=False``): the lean cached step never calls the module on
    all tokens; tests/clusca/test_clusca_reference.py holds it to the same results.
    """
    case = tiny_flux()
    ff = case.model.transformer_blocks[0].ff
    plain_ff = copy.deepcopy(ff)
    apply_clusca(case.model, lean=False)
    state = run_state(case.model)
    seen = {}

    def capture(mod, inputs, output):
        if state.full or seen:
            return
        x = inputs[0]
        seen.update(x=x, y=output.clone(), true=plain_ff(x), rows=state.fresh_rows("transformer_blocks.0.ff"),
                    assign=state.clusters("image").assign.clone(), d=state.steps_since_full)

    handle = ff.register_forward_hook(capture)
    x0 = case.latents(2, seed=1)
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    with torch.no_grad(), clusca_run(case.model, cfg, num_inference_steps=steps):
        x = x0
        for i in range(steps):
            v = case.model(**case.make_kwargs(x, sigmas[i], [1, 2]))[0]
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    handle.remove()
    remove_clusca(case.model)
    assert seen, "no cached step reached the feed-forward module"
    return seen


def test_anchored_fresh_tokens_are_exact():
    s = run_capturing_ff(ClusCaConfig(interval=3, warmup=2, propagation="anchored"))
    b, n, d = s["y"].shape
    rows = s["rows"]
    y, true = s["y"].reshape(-1, d), s["true"].reshape(-1, d)
    torch.testing.assert_close(y[rows], true[rows], atol=1e-5, rtol=1e-5)
    # Only one token per cluster and sample was recomputed.
    assert rows.numel() == b * 16
    # The other tokens are predictions, not recomputations.
    others = torch.ones(b * n, dtype=torch.bool)
    others[rows] = False
    assert not torch.allclose(y[others], true[others], atol=1e-5)


def test_paper_fresh_tokens_are_extrapolated_from_the_fresh_value():
    s = run_capturing_ff(ClusCaConfig(interval=3, warmup=2, propagation="paper"))
    d = s["y"].shape[-1]
    rows = s["rows"]
    y, true = s["y"].reshape(-1, d)[rows], s["true"].reshape(-1, d)[rows]
    # F0 holds the fresh value; the first-order term still moves it (the overshoot).
    assert s["d"] > 0
    assert not torch.allclose(y, true, atol=1e-5)


def test_full_propagation_copies_each_clusters_fresh_value_to_its_members():
    # Order 0 and gamma 1: every token's output becomes its cluster's fresh output.
    s = run_capturing_ff(ClusCaConfig(interval=3, warmup=2, order=0, gamma=1.0))
    b, n, d = s["y"].shape
    fresh_tokens = (s["rows"].view(b, -1) - (torch.arange(b) * n).view(b, 1))  # (b, k)
    for i in range(b):
        rep = fresh_tokens[i][s["assign"][i]]  # each token's cluster representative
        torch.testing.assert_close(s["y"][i], s["true"][i][rep], atol=1e-5, rtol=1e-5)
        # Each non-empty cluster's representative is one of its own members.
        k = fresh_tokens.shape[1]
        nonempty = s["assign"][i].bincount(minlength=k) > 0
        assert nonempty.sum() >= k // 2
        assert torch.equal(s["assign"][i][fresh_tokens[i]][nonempty], torch.arange(k)[nonempty])


def run_guided(cfg: ClusCaConfig, same_latents: bool = True, steps: int = 6):
    """Classifier-free guidance in one call (batch = [uncond; cond], as diffusers pipelines
    do); returns the image clusters and the first dual block's fresh rows of the first cached
    step, plus the batch size and token count."""
    case = tiny_flux()
    apply_clusca(case.model, lean=False)
    state = run_state(case.model)
    ff = case.model.transformer_blocks[0].ff
    seen = {}

    def capture(mod, inputs, output):
        if state.full or seen:
            return
        seen.update(rows=state.fresh_rows("transformer_blocks.0.ff").clone(),
                    assign=state.clusters("image").assign.clone(), shape=inputs[0].shape[:2])

    handle = ff.register_forward_hook(capture)
    x = case.latents(2, seed=1)
    other = case.latents(2, seed=2)
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    with torch.no_grad(), clusca_run(case.model, cfg, num_inference_steps=steps):
        for i in range(steps):
            model_in = torch.cat([x, x if same_latents else other])
            v = case.model(**case.make_kwargs(model_in, sigmas[i], [1, 2, 3, 4]))[0]
            v_uncond, v_cond = v.chunk(2)
            x = x + (sigmas[i + 1] - sigmas[i]) * (v_uncond + 5.0 * (v_cond - v_uncond))
    handle.remove()
    remove_clusca(case.model)
    assert seen, "no cached step reached the feed-forward module"
    b, n = seen["shape"]
    seen["tokens"] = seen["rows"].view(b, -1) - (torch.arange(b) * n).view(b, 1)  # fresh positions per sample
    return seen


def test_guidance_halves_of_one_image_refresh_the_same_tokens():
    s = run_guided(ClusCaConfig(interval=3, warmup=2))
    assert torch.equal(s["assign"][:2], s["assign"][2:])
    assert torch.equal(s["tokens"][:2], s["tokens"][2:])
    # The two images of the batch still get their own clusters.
    assert not torch.equal(s["assign"][0], s["assign"][1])


def test_guidance_pairs_off_clusters_each_half_on_its_own():
    s = run_guided(ClusCaConfig(interval=3, warmup=2, guidance_pairs=False))
    assert not torch.equal(s["assign"][:2], s["assign"][2:])
    assert not torch.equal(s["tokens"][:2], s["tokens"][2:])


def test_batches_with_different_halves_are_not_paired():
    s = run_guided(ClusCaConfig(interval=3, warmup=2), same_latents=False)
    assert not torch.equal(s["assign"][:2], s["assign"][2:])


def _expected_tokens(seed: int, step: int, group: str, layers: int, assign: torch.Tensor, k: int) -> torch.Tensor:
    """The documented draw, computed directly: per (layer, sample, cluster) the member with the
    highest score of a generator seeded by (seed, step, group); -1 for an empty cluster."""
    gen = torch.Generator().manual_seed(mix(seed, step, len(group), ord(group[0])))
    scores = torch.rand(layers, assign.shape[1], generator=gen)
    out = torch.full((layers, assign.shape[0], k), -1, dtype=torch.long)
    for lay in range(layers):
        for i in range(assign.shape[0]):
            for c in range(k):
                members = (assign[i] == c).nonzero().flatten()
                if members.numel():
                    out[lay, i, c] = members[scores[lay, members].argmax()]
    return out


@pytest.mark.parametrize("images", [1, 2])
def test_fresh_tokens_of_every_cached_step_follow_the_documented_draw(images):
    # Interval 4: three cached steps per clustering, picked together on the first of them;
    # a second identical run reuses the kept draws and must give the same picks and output.
    cfg = ClusCaConfig(interval=4, warmup=2, order=0, gamma=0.0, clusters=4, seed=7, refresh_text=True)
    case = tiny_flux()
    apply_clusca(case.model)
    state = run_state(case.model)
    steps = 9

    def run():
        seen = []

        def capture(mod, inputs, output):
            if state.full:
                return
            for group in ("image", "text"):
                clusters = state.clusters(group)
                seen.append((state.step, group, state.group_fresh_rows(group), clusters.assign.clone(), clusters.k))

        # The text feed-forward runs after the image one: both groups have picked by then.
        handle = case.model.transformer_blocks[0].ff_context.register_forward_hook(capture)
        x = case.latents(images, seed=3)
        sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
        with torch.no_grad(), clusca_run(case.model, cfg, num_inference_steps=steps):
            for i in range(steps):
                v = case.model(**case.make_kwargs(torch.cat([x, x]), sigmas[i], list(range(1, 2 * images + 1))))[0]
                u, c = v.chunk(2)
                x = x + (sigmas[i + 1] - sigmas[i]) * (u + 5.0 * (c - u))
        handle.remove()
        return x, seen

    out, seen = run()
    again, seen_again = run()
    remove_clusca(case.model)
    assert torch.equal(out, again)
    assert [s[0] for s in seen] == [s[0] for s in seen_again]
    cached = sorted({s[0] for s in seen})
    assert cached == [s for s in range(steps) if not cfg.is_full_step(s)]
    for (step, group, rows, assign, k), other in zip(seen, seen_again):
        assert torch.equal(rows, other[2])
        b, n = assign.shape
        tokens = rows.view(rows.shape[0], b, k) - (torch.arange(b) * n).view(1, b, 1)
        want = _expected_tokens(cfg.seed, step, group, rows.shape[0], assign, k)
        filled = want >= 0
        assert torch.equal(tokens[filled], want[filled])
        # Both guidance halves of an image refresh the same tokens.
        assert torch.equal(tokens[:, : b // 2], tokens[:, b // 2:])


def test_cluster_bytes_count_the_flat_index_before_it_is_built():
    from clusca.state import GroupClusters

    assign = torch.tensor([[0, 1, 1, 2], [2, 2, 0, 1]])
    g = GroupClusters(assign=assign, centroids=torch.zeros(2, 3, 5), k=3)
    before = g.nbytes()
    torch.testing.assert_close(g.flat_index, torch.tensor([0, 1, 1, 2, 5, 5, 3, 4]))
    assert g.nbytes() == before == 2 * 8 * 8 + 2 * 3 * 5 * 4



def _sample_with_stats(make_case, cfg: ClusCaConfig, steps: int = 7, lean: bool = True):
    case = make_case()
    apply_clusca(case.model, lean=lean)
    with clusca_run(case.model, cfg, num_inference_steps=steps) as run:
        out = euler_sample(case, case.latents(2, seed=3), steps, [1, 2])
    remove_clusca(case.model)
    return out, run.stats


@pytest.mark.parametrize("make_case", [tiny_flux, tiny_sd3, tiny_hunyuan_video])
@pytest.mark.parametrize("order", [0, 1])
def test_fresh_text_tokens_cannot_change_the_output(make_case, order):
    # On a cached step the text stream feeds only predicted modules, so the authors'
    # fresh text tokens are wasted work: skipping them (the default) changes nothing.
    # Bit-identical on the module hooks; the lean cached step (which never computes the text
    # stream) agrees with them within rounding.
    base = dict(interval=3, warmup=2, order=order, clusters=4, gamma=0.005)
    on_out, on = _sample_with_stats(make_case, ClusCaConfig(**base, refresh_text=True, propagate_text=True))
    off_out, off = _sample_with_stats(make_case, ClusCaConfig(**base), lean=False)
    assert torch.equal(on_out, off_out)
    lean_out, lean = _sample_with_stats(make_case, ClusCaConfig(**base))
    torch.testing.assert_close(lean_out, off_out, rtol=1e-5, atol=1e-5)
    assert (lean.tokens_computed, lean.flops) == (off.tokens_computed, off.flops)
    # ... while they were computed: text clusterings and text tokens on every cached step.
    assert on.kmeans_calls == 2 * off.kmeans_calls > 0
    assert on.tokens_computed > off.tokens_computed and on.flops > off.flops
    # The image stream's fresh tokens do reach the output.
    fora_out, _ = _sample_with_stats(make_case, ClusCaConfig(**base, mode="fora"))
    assert not torch.equal(off_out, fora_out)


def test_propagate_text_needs_refresh_text():
    with pytest.raises(ValueError, match="propagate_text: needs refresh_text"):
        ClusCaConfig(propagate_text=True).validate()


@pytest.mark.parametrize("make_case", [tiny_flux, tiny_sd3, tiny_hunyuan_video])
def test_text_side_norms_run_on_full_steps_only(make_case):
    case = make_case()
    apply_clusca(case.model, lean=False)  # bit-identical outputs hold on the module hooks
    # The projection inside the first block's text norm: counts real executions, not calls.
    calls = []
    linear = case.model.transformer_blocks[0].norm1_context.linear
    linear.register_forward_hook(lambda *_: calls.append(1))
    steps = 7
    runs = {}
    for refresh in (False, True):
        calls.clear()
        cfg = ClusCaConfig(interval=3, warmup=2, order=1, clusters=4, refresh_text=refresh)
        with clusca_run(case.model, cfg, num_inference_steps=steps) as run:
            runs[refresh] = euler_sample(case, case.latents(2, seed=5), steps, [1, 2])
        runs[(refresh, "calls")] = len(calls)
        runs[(refresh, "stats")] = run.stats
    remove_clusca(case.model)
    full = run.stats.full_steps
    assert 0 < full < steps
    assert runs[(False, "calls")] == full and runs[(True, "calls")] == steps
    assert torch.equal(runs[False], runs[True])
    assert runs[(False, "stats")].flops < runs[(True, "stats")].flops
    # FORA and TaylorSeer skip them as well: they are dead whenever attention is predicted.
    calls.clear()
    apply_clusca(case.model)
    with clusca_run(case.model, ClusCaConfig(mode="fora", interval=3, warmup=2), num_inference_steps=steps):
        euler_sample(case, case.latents(2, seed=5), steps, [1, 2])
    assert len(calls) == full
