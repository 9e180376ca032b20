"""Mode ``off`` skips the module hooks for the run: same outputs, same statistics, hooks back after."""

import dataclasses

import pytest
import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook

from clusca import ClusCaConfig, apply_clusca, clusca_run
from clusca.install import get_controller, remove_clusca
from clusca.testing import euler_sample, tiny_flux, tiny_sd3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _CountingHook(ModelHook):
    """A hook of someone else's, registered after ClusCa's: counts the calls it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


def _forwards(modules: list[torch.nn.Module]) -> list[object]:
    return [m.__dict__.get("forward") for m in modules]


@pytest.mark.parametrize("make", [tiny_flux, tiny_sd3])
def test_off_runs_the_plain_modules_and_restores_the_hooks(make):
    case = make()
    steps = 5
    x = case.latents(2, seed=4)
    with torch.no_grad():
        plain = euler_sample(case, x, steps)
    ctrl = apply_clusca(case.model)
    hooked = _forwards(ctrl.bypass_modules)
    assert all(f is not None for f in hooked) and len(hooked) >= len(ctrl.slots)
    seen_inside: list[object] = []
    with torch.no_grad(), clusca_run(case.model, ClusCaConfig(mode="off"), num_inference_steps=steps) as run:
        seen_inside = _forwards(ctrl.bypass_modules)
        out = euler_sample(case, x, steps)
    # During the run no module went through a ClusCa hook; afterwards every hook is back.
    assert all(a is not b for a, b in zip(seen_inside, hooked))
    assert _forwards(ctrl.bypass_modules) == hooked
    assert torch.equal(out, plain)
    stats = run.stats
    assert stats.mode == "off" and stats.full_steps == steps and stats.cached_steps == 0
    assert stats.calls == steps and stats.token_fraction == 1.0
    assert stats.tokens_computed == stats.tokens_uncached > 0
    assert stats.flops == stats.flops_uncached > 0 and stats.cache_bytes == 0


def test_off_statistics_match_a_run_through_the_hooks():
    # Same counts as when every call goes through the module hooks (a caching run whose
    # schedule computes every step in full).
    case = tiny_flux()
    steps = 4
    x = case.latents(2, seed=5)
    apply_clusca(case.model)
    with torch.no_grad(), clusca_run(case.model, ClusCaConfig(mode="off"), num_inference_steps=steps) as off:
        out_off = euler_sample(case, x, steps)
    full = dataclasses.replace(ClusCaConfig.preset("balanced"), interval=1)
    with torch.no_grad(), clusca_run(case.model, full, num_inference_steps=steps) as every:
        out_every = euler_sample(case, x, steps)
    assert torch.allclose(out_off, out_every)
    a, b = off.stats, every.stats
    for field in ("calls", "full_steps", "cached_steps", "tokens_computed", "tokens_uncached", "flops",
                  "flops_uncached"):
        assert getattr(a, field) == getattr(b, field), field


def test_hooks_come_back_when_the_run_raises():
    case = tiny_flux()
    ctrl = apply_clusca(case.model)
    hooked = _forwards(ctrl.bypass_modules)
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), clusca_run(case.model, "off", num_inference_steps=2):
            raise RuntimeError("boom")
    assert _forwards(ctrl.bypass_modules) == hooked
    # And a caching run afterwards goes through them again.
    with torch.no_grad(), clusca_run(case.model, "balanced", num_inference_steps=8) as run:
        euler_sample(case, case.latents(1, seed=1), 8)
    assert run.stats.cached_steps > 0
    remove_clusca(case.model)
    assert get_controller(case.model) is None


def test_a_foreign_outer_hook_keeps_its_chain_in_off_mode():
    case = tiny_flux()
    ctrl = apply_clusca(case.model)
    target = ctrl.slot_modules[0]
    counter = _CountingHook()
    HookRegistry.check_if_exists_or_initialize(target).register_hook(counter, "someone_else")
    steps = 3
    with torch.no_grad(), clusca_run(case.model, "off", num_inference_steps=steps) as run:
        euler_sample(case, case.latents(1, seed=2), steps)
    assert counter.calls == steps  # still called: its module was left on the hook chain
    assert run.stats.full_steps == steps
    HookRegistry.check_if_exists_or_initialize(target).remove_hook("someone_else", recurse=False)
