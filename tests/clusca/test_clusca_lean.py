"""The lean cached step: when it runs, when it steps aside, and what it keeps in place."""

from __future__ import annotations

import copy

import diffusers
import pytest
import torch

from clusca import ClusCaConfig, apply_clusca, clusca_run, remove_clusca, run_state
from clusca import diffusers_compat
from clusca.taylor import Factors, coefficients
from clusca.testing import HostReads, euler_sample, tiny_flux, tiny_hunyuan_video, tiny_pixart, tiny_sd3

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = ClusCaConfig(interval=3, warmup=2, order=1, clusters=4, gamma=0.1)


def test_diffusers_release_is_the_one_the_hook_internals_were_written_for():
    # clusca/diffusers_compat.py reads non-public parts of diffusers.hooks; a new release
    # must be checked against it (and TESTED_WITH moved) before it is allowed.
    assert diffusers.__version__.startswith(diffusers_compat.TESTED_WITH + "."), diffusers.__version__


@pytest.mark.parametrize("make_case", [tiny_flux, tiny_hunyuan_video, tiny_sd3,
                                       lambda: tiny_sd3(dual_attention=True)], ids=["flux", "hunyuan", "sd3", "sd35"])
@pytest.mark.parametrize("mode", ["fora", "taylorseer", "clusca"])
def test_every_cached_step_of_a_dual_stream_model_takes_the_lean_path(mode, make_case):
    case = make_case()
    apply_clusca(case.model)
    with torch.inference_mode(), clusca_run(case.model, ClusCaConfig(**{**CFG.to_dict(), "mode": mode}),
                                            num_inference_steps=10) as run:
        euler_sample(case, case.latents(2), 10, [1, 2])
        lean = run_state(case.model).lean_steps
    assert run.stats.cached_steps > 0 and lean == run.stats.cached_steps


def test_architectures_without_an_adapter_stay_on_the_module_hooks():
    case = tiny_pixart()
    apply_clusca(case.model)
    with torch.inference_mode(), clusca_run(case.model, CFG, num_inference_steps=8) as run:
        euler_sample(case, case.latents(1), 8, [1])
        assert run_state(case.model).lean_steps == 0
    assert run.stats.cached_steps > 0


def _run(model_case, cfg, steps=8, extra=None, grad=False):
    x = model_case.latents(1, seed=4)
    ctx = torch.enable_grad() if grad else torch.inference_mode()
    with ctx, clusca_run(model_case.model, cfg, num_inference_steps=steps) as run:
        xs = x.clone()
        sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
        for i in range(steps):
            kwargs = model_case.make_kwargs(xs, sigmas[i], [3])
            kwargs.update(extra or {})
            v = model_case.model(**kwargs)[0]
            xs = (xs + (sigmas[i + 1] - sigmas[i]) * v).detach()
        lean = run_state(model_case.model).lean_steps
    return xs, run.stats, lean


@pytest.mark.parametrize("variant", ["refresh_text", "grad", "joint_attention_kwargs", "lean_off", "modules"])
def test_calls_the_lean_step_does_not_handle_go_through_the_hooks_with_the_same_result(variant):
    case = tiny_flux()
    ref = copy.deepcopy(case)
    apply_clusca(ref.model, lean=False)
    want, want_stats, _ = _run(ref, CFG)
    cfg, extra, grad, lean = CFG, None, False, True
    if variant == "refresh_text":
        cfg = ClusCaConfig(**{**CFG.to_dict(), "refresh_text": True})
    elif variant == "grad":
        grad = True
    elif variant == "joint_attention_kwargs":
        extra = {"joint_attention_kwargs": {"scale": 1.0}}
    elif variant == "lean_off":
        lean = False
    else:
        cfg = ClusCaConfig(**{**CFG.to_dict(), "modules": {"attention": [r"transformer_blocks\.\d+\.attn"]}})
    apply_clusca(case.model, lean=lean)
    got, stats, lean_steps = _run(case, cfg, extra=extra, grad=grad)
    assert lean_steps == 0 and stats.cached_steps > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lean_and_hook_paths_agree_and_count_the_same_work():
    case = tiny_flux()
    ref = copy.deepcopy(case)
    apply_clusca(case.model)
    apply_clusca(ref.model, lean=False)
    got, stats, lean = _run(case, CFG, steps=12)
    want, want_stats, _ = _run(ref, CFG, steps=12)
    assert lean == stats.cached_steps > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (stats.tokens_computed, stats.flops) == (want_stats.tokens_computed, want_stats.flops)
    # The lean run keeps nothing of the text stream (its hooks are bypassed): less cache.
    assert 0 < stats.cache_bytes < want_stats.cache_bytes
    remove_clusca(case.model)


def test_factor_buffers_are_allocated_once_per_run_and_updated_in_place():
    case = tiny_flux()
    apply_clusca(case.model)
    state = run_state(case.model)
    name = "transformer_blocks.0.attn"
    ptrs = set()
    steps = 14
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    with torch.inference_mode(), clusca_run(case.model, CFG, num_inference_steps=steps):
        x = case.latents(1)
        for i in range(steps):
            x = x + (sigmas[i + 1] - sigmas[i]) * case.model(**case.make_kwargs(x, sigmas[i], [1]))[0]
            ptrs.update(f.data_ptr() for f in state.factors(name))
            assert len(state.factors(name)) == min(2, 1 + sum(CFG.is_full_step(s) for s in range(1, i + 1)))
    assert len(ptrs) == 2  # F_0 and F_1, the same storage from the first full step to the last


def test_taylor_factors_are_the_finite_differences_of_the_full_step_outputs():
    g = torch.Generator().manual_seed(0)
    ys = [torch.randn(3, 5, generator=g) for _ in range(4)]
    gaps = [2, 3, 1]
    f = Factors(ys[0], order=2, keep_raw=False)
    d1_prev = None
    for y_prev, y, d in zip(ys, ys[1:], gaps):
        f.update(y, d, order=2)
        d1 = (y - y_prev) / d
        torch.testing.assert_close(f.views[0], y)
        torch.testing.assert_close(f.views[1], d1)
        if d1_prev is not None:
            torch.testing.assert_close(f.views[2], (d1 - d1_prev) / d)
        d1_prev = d1
    assert f.n == 3
    c = coefficients(2, 2)
    torch.testing.assert_close(f.predict(c), f.views[0] + 2 * f.views[1] + 2 * f.views[2])
    torch.testing.assert_close(f.predict(c, base=ys[0]), ys[0] + f.views[0] + 2 * f.views[1] + 2 * f.views[2])
    one = Factors(ys[0], order=0, keep_raw=False)
    assert one.predict((1.0,)).data_ptr() != one.views[0].data_ptr()  # handed out: a copy
    assert one.predict((1.0,), copy=False) is one.views[0]


def test_raw_output_keeps_differences_between_true_outputs_when_f0_is_edited():
    y0, y1 = torch.zeros(2, 4), torch.ones(2, 4)
    f = Factors(y0, order=1, keep_raw=True)
    f.views[0].fill_(5.0)  # fresh tokens edited F_0 between full steps
    f.update(y1, 1, order=1)
    torch.testing.assert_close(f.views[1], y1 - y0)


def test_announced_steps_make_cached_steps_free_of_host_reads_with_the_same_result():
    case = tiny_flux()
    ref = copy.deepcopy(case)
    apply_clusca(case.model)
    apply_clusca(ref.model)
    steps = 9
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    outs, reads = {}, {}
    for name, model_case in (("announced", case), ("read", ref)):
        state = run_state(model_case.model)
        reads[name] = []
        x = model_case.latents(1, seed=2)
        with torch.inference_mode(), clusca_run(model_case.model, CFG, num_inference_steps=steps) as run:
            for _ in range(2):  # a second loop in the same run starts again at step 0
                xs = x.clone()
                for i in range(steps):
                    if name == "announced":
                        run.set_step(i)
                    with HostReads() as counter:
                        v = model_case.model(**model_case.make_kwargs(xs, sigmas[i], [1]))[0]
                    if not state.full:
                        reads[name].append(counter.count)
                    xs = xs + (sigmas[i + 1] - sigmas[i]) * v
            outs[name] = (xs, run.stats)
    (a, sa), (b, sb) = outs["announced"], outs["read"]
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert (sa.full_steps, sa.cached_steps, sa.flops) == (sb.full_steps, sb.cached_steps, sb.flops)
    assert reads["announced"] and set(reads["announced"]) == {0}
    assert min(reads["read"]) > 0  # without the announcement the timestep is read: the check sees it


def test_set_step_refuses_what_is_not_a_step():
    case = tiny_flux()
    with clusca_run(case.model, CFG) as run:
        with pytest.raises(ValueError, match="step: must be a non-negative integer"):
            run.set_step(-1)
