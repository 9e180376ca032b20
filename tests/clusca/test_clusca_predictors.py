"""The two predictors, Taylor and HiCache's scaled Hermite: their weights, and that the chosen
one is what every cached path (module hooks, lean step, recorded step) predicts with."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from clusca import ClusCaConfig, apply_clusca, clusca_run
from clusca.capture import CallReplay, using_backend
from clusca.taylor import coefficient_table, coefficients, coefficients_from
from clusca.testing import euler_sample, tiny_flux, tiny_pixart

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _hermite_reference(y: float, k: int) -> float:
    # numpy's own physicists' Hermite series: coefficient vector e_k evaluates H_k.
    return float(np.polynomial.hermite.hermval(y, [0] * k + [1]))


@pytest.mark.parametrize("scale", [0.3, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("d", [1, 2, 5])
def test_hermite_weights_are_scaled_hermite_polynomials(d, scale):
    got = coefficients(d, 4, "hermite", scale)
    want = [scale**k * _hermite_reference(scale * d, k) / math.factorial(k) for k in range(5)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_taylor_weights_and_where_the_two_predictors_meet():
    assert coefficients(3, 3) == pytest.approx((1, 3, 4.5, 4.5))
    for d in (1, 2, 7):
        # Order 0 is plain reuse whatever the predictor; at s = 1/sqrt(2) the first-order term is Taylor's.
        assert coefficients(d, 0, "hermite", 0.3) == (1.0,)
        assert coefficients(d, 1, "hermite", 2**-0.5) == pytest.approx(coefficients(d, 1))
        # A smaller contraction damps the first-order extrapolation.
        assert coefficients(d, 1, "hermite", 0.5)[1] == pytest.approx(0.5 * d)
    with pytest.raises(ValueError, match="predictor"):
        coefficients(1, 1, "legendre")


@pytest.mark.parametrize("predictor,scale", [("taylor", 0.5), ("hermite", 0.5), ("hermite", 0.8)])
@pytest.mark.parametrize("order", [0, 1, 2, 4])
def test_the_device_side_weights_equal_the_host_ones(predictor, scale, order):
    table = coefficient_table(order, torch.float64, "cpu", predictor, scale)
    for d in (1, 3, 6):
        got = coefficients_from(torch.tensor(float(d), dtype=torch.float64), table)
        assert got.tolist() == pytest.approx(coefficients(d, order, predictor, scale), rel=1e-12, abs=1e-12)


def test_the_settings_check_the_predictor_and_its_scale():
    assert ClusCaConfig.from_dict({"predictor": "hermite", "hermite_scale": 0.7}).hermite_scale == 0.7
    for bad, field in (({"predictor": "spline"}, "predictor"), ({"hermite_scale": 0}, "hermite_scale"),
                       ({"hermite_scale": 1.5}, "hermite_scale"), ({"predictor": 1}, "predictor")):
        with pytest.raises(ValueError, match=f"^{field}"):
            ClusCaConfig.from_dict(bad)


def _sample(case, cfg: ClusCaConfig, steps: int = 12) -> torch.Tensor:
    with torch.inference_mode(), clusca_run(case.model, cfg, num_inference_steps=steps):
        return euler_sample(case, case.latents(2, seed=3), steps, [1, 2])


TAYLORSEER = dict(mode="taylorseer", interval=4, warmup=2, order=2)
CLUSCA = dict(mode="clusca", interval=4, warmup=2, order=2, clusters=4, gamma=0.05)


@pytest.mark.parametrize("make_case,lean", [(tiny_flux, True), (tiny_flux, False), (tiny_pixart, False)],
                         ids=["flux-lean", "flux-hooks", "pixart-hooks"])
@pytest.mark.parametrize("knobs", [TAYLORSEER, CLUSCA], ids=["taylorseer", "clusca"])
def test_the_chosen_predictor_is_what_a_cached_step_predicts_with(make_case, lean, knobs):
    case = make_case()
    apply_clusca(case.model, lean=lean)
    taylor = _sample(case, ClusCaConfig(**knobs))
    hermite = _sample(case, ClusCaConfig(**knobs, predictor="hermite", hermite_scale=0.5))
    again = _sample(case, ClusCaConfig(**knobs, predictor="hermite", hermite_scale=0.5))
    assert torch.equal(hermite, again)
    assert (hermite - taylor).abs().max() > 1e-4  # the damped weights reached the prediction
    # Order 1 at s = 1/sqrt(2): the same weights, so the same sample up to rounding.
    one = {**knobs, "order": 1}
    assert torch.allclose(_sample(case, ClusCaConfig(**one, predictor="hermite", hermite_scale=2**-0.5)),
                          _sample(case, ClusCaConfig(**one)), atol=1e-5)


def test_lean_step_and_module_hooks_agree_under_the_hermite_predictor():
    cfg = ClusCaConfig(**CLUSCA, predictor="hermite", hermite_scale=0.6)
    lean_case = tiny_flux()
    hooks_case = copy.deepcopy(lean_case)
    apply_clusca(lean_case.model)
    apply_clusca(hooks_case.model, lean=False)
    assert torch.allclose(_sample(lean_case, cfg), _sample(hooks_case, cfg), atol=1e-5)


@pytest.mark.parametrize("predictor", ["taylor", "hermite"])
def test_a_recorded_cached_step_computes_its_weights_itself(predictor):
    # CallReplay stands in for a CUDA graph on the CPU: replays run the recorded step with the
    # static inputs, so the weights must come from the step offset held on the device. Order 2
    # also checks that a later run replays the steps recorded with one and with two factors
    # of difference each as they were recorded (the factor counts of a recording are fixed).
    cfg = ClusCaConfig(**TAYLORSEER, predictor=predictor, hermite_scale=0.6)
    eager_case = tiny_flux()
    recorded_case = copy.deepcopy(eager_case)
    apply_clusca(eager_case.model)
    apply_clusca(recorded_case.model)
    want = _sample(eager_case, ClusCaConfig(**{**cfg.to_dict(), "capture": "off"}))
    with using_backend(CallReplay()):
        first = _sample(recorded_case, cfg)  # records
        with torch.inference_mode(), clusca_run(recorded_case.model, cfg, num_inference_steps=12) as run:
            replayed = euler_sample(recorded_case, recorded_case.latents(2, seed=3), 12, [1, 2])
    assert run.stats.graph_replays > 0
    assert torch.allclose(first, want, atol=1e-5) and torch.allclose(replayed, want, atol=1e-5)
