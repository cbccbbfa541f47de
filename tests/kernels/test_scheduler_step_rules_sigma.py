"""The sigma-ODE rules of scheduler_step_coeffs (ode_derivative, heun, lms_weights, linear_multistep)
against float64 formulas written here, through the fused step on every backend.

- lms_weights: the integral of each Lagrange basis polynomial, built and integrated with numpy's
  Polynomial in float64; the Adams-Bashforth weights on a uniform grid; diffusers' quad-integrated
  coefficients (its get_lms_coefficient on a float64 sigma table).
- ode_derivative, heun (both stages, with and without clipping), linear_multistep: each StepCoeffs
  applied by ``scheduler_step`` (C++ "fused" and "ref" in fp32, "ref" in fp64) against the update
  written out in float64: x0 from the prediction type, d = (x - x0)/sigma, the Euler / trapezoid /
  multistep sums.

Bound per element: rtol * (sum of the absolute terms of the float64 formula) + rtol/10, with rtol 1e-5
for fp32 (the kernel rounds each of a handful of terms to fp32: ~1e-7 each) and 1e-12 for fp64.
"""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch
from numpy.polynomial import Polynomial

from fusediff.kernels import scheduler_step, use_backend
from fusediff.kernels import scheduler_step_coeffs as sc

SHAPE = (2, 3, 7, 5)  # odd sizes
PREDS = ("epsilon", "sample", "v_prediction")
MODES = {"fused-fp32": ("fused", torch.float32, 1e-5), "ref-fp32": ("ref", torch.float32, 1e-5),
         "ref-fp64": ("ref", torch.float64, 1e-12)}
AB = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
      5: [1901 / 720, -2774 / 720, 2616 / 720, -1274 / 720, 251 / 720]}  # Adams-Bashforth, newest first
NODES = [[14.6], [14.6, 20.1], [3.3, 4.0, 6.5], [0.7, 1.1, 1.9, 3.0], [0.03, 0.09, 0.2, 0.5, 1.2]]  # current first


@pytest.fixture(params=list(MODES))
def mode(request):
    backend, dtype, rtol = MODES[request.param]
    with use_backend(backend):
        yield dtype, rtol


def randn(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def x0_of(x, m, sigma: float, pred: str):
    """x0 of the unscaled sample x = x0 + sigma*eps, float64 (Karras et al. 2022; Salimans & Ho 2022 for v)."""
    if pred == "epsilon":
        return x - sigma * m
    if pred == "sample":
        return m
    return x / (sigma**2 + 1) - sigma / math.sqrt(sigma**2 + 1) * m


def check(out, ref, size, rtol, what):
    diff = (out.double() - ref).abs()
    bound = rtol * size + rtol * 0.1
    bad = ~(diff <= bound)
    if bad.any():
        i = tuple(int(j) for j in torch.nonzero(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} elements out of bound; max |diff| {diff.max().item():.3e}; at "
                             f"{i}: got {out[i].item():.10g}, want {ref[i].item():.10g}, bound {bound[i].item():.3e}")


# -- weights -----------------------------------------------------------------------------------
def lagrange_integral(nodes, j, a, b) -> float:
    others = [s for k, s in enumerate(nodes) if k != j]
    basis = Polynomial.fromroots(others) / np.prod([nodes[j] - s for s in others]) if others else Polynomial([1.0])
    antiderivative = basis.integ()
    return float(antiderivative(b) - antiderivative(a))


@pytest.mark.parametrize("nodes", NODES, ids=[f"{len(n)}_nodes" for n in NODES])
def test_lms_weights_are_lagrange_integrals(nodes):
    for sigma_next in (0.0, nodes[0] * 0.6):
        got = sc.lms_weights(nodes, sigma_next)
        want = [lagrange_integral(nodes, j, nodes[0], sigma_next) for j in range(len(nodes))]
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-13 * max(nodes) ** len(nodes))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_lms_weights_on_a_uniform_grid_are_adams_bashforth(k):
    h, s0 = 0.25, 2.0
    nodes = [s0 + j * h for j in range(k)]  # earlier levels are higher: the run descends in sigma
    np.testing.assert_allclose(sc.lms_weights(nodes, s0 - h), [-h * b for b in AB[k]], rtol=1e-12, atol=1e-15)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_lms_weights_match_diffusers(order):
    sched = diffusers.LMSDiscreteScheduler(use_karras_sigmas=True)
    sched.set_timesteps(12)
    sched.sigmas = sched.sigmas.double()
    sigmas = sched.sigmas.tolist()
    for i in range(order - 1, 12):
        want = [sched.get_lms_coefficient(order, i, j) for j in range(order)]
        got = sc.lms_weights([sigmas[i - j] for j in range(order)], sigmas[i + 1])
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=f"step {i}")


# -- rules through the fused step --------------------------------------------------------------
@pytest.mark.parametrize("pred", PREDS)
def test_ode_derivative(mode, pred):
    dtype, rtol = mode
    x, m, sigma = randn(0) * 3, randn(1), 2.7
    out = scheduler_step(x.to(dtype), m.to(dtype), sc.ode_derivative(sigma, prediction_type=pred))
    ref = (x - x0_of(x, m, sigma, pred)) / sigma
    check(out, ref, (x.abs() + sigma * m.abs()) / sigma, rtol, f"ode_derivative {pred}")


@pytest.mark.parametrize("clip", [None, 1.2])
@pytest.mark.parametrize("pred", PREDS)
def test_heun_both_stages(mode, pred, clip):
    dtype, rtol = mode
    sigma, sigma_next = 5.5, 2.25
    x, m1, m2 = randn(2) * sigma, randn(3), randn(4)

    def clipped(t):
        return t if clip is None else t.clamp(-clip, clip)

    # 1. predictor: x' = x + dt d1
    x01 = clipped(x0_of(x, m1, sigma, pred))
    d1 = (x - x01) / sigma
    ref1 = x + (sigma_next - sigma) * d1
    c1 = sc.heun(sigma, sigma_next, prediction_type=pred, clip_sample_range=clip)
    out1, got_x01 = scheduler_step(x.to(dtype), m1.to(dtype), c1, return_pred=True)
    size1 = x.abs() * (1 + sigma) + sigma * m1.abs()
    check(out1, ref1, size1, rtol, f"heun predictor {pred}")
    check(got_x01, x01, size1, rtol, f"heun predictor x0 {pred}")
    # 2. corrector at x' (the reference's own): x + dt (d1 + d2)/2, with x and x0 of stage 1 as history
    x02 = clipped(x0_of(ref1, m2, sigma_next, pred))
    d2 = (ref1 - x02) / sigma_next
    ref2 = x + (sigma_next - sigma) * (d1 + d2) / 2
    c2 = sc.heun(sigma, sigma_next, prediction_type=pred, second_stage=True, clip_sample_range=clip)
    out2, got_x02 = scheduler_step(ref1.to(dtype), m2.to(dtype), c2, history=[x.to(dtype), x01.to(dtype)],
                                   return_pred=True)
    check(out2, ref2, size1 + ref1.abs() * (1 + sigma) + sigma * m2.abs(), rtol, f"heun corrector {pred}")
    check(got_x02, x02, ref1.abs() + sigma * m2.abs(), rtol, f"heun corrector x0 {pred}")


@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("nodes", NODES, ids=[f"{len(n)}_nodes" for n in NODES])
def test_lms_step(mode, nodes, pred):
    dtype, rtol = mode
    sigma, sigma_next = nodes[0], nodes[0] * 0.5
    x, m = randn(5) * sigma, randn(6)
    earlier = [randn(10 + j) for j in range(len(nodes) - 1)]  # d at the earlier levels, newest first
    weights = [lagrange_integral(nodes, j, sigma, sigma_next) for j in range(len(nodes))]
    x0 = x0_of(x, m, sigma, pred)
    d0 = (x - x0) / sigma
    ref = x + weights[0] * d0 + sum(w * d for w, d in zip(weights[1:], earlier))
    coeffs = sc.linear_multistep(sigma, sc.lms_weights(nodes, sigma_next), prediction_type=pred)
    out, got_x0 = scheduler_step(x.to(dtype), m.to(dtype), coeffs, history=[d.to(dtype) for d in earlier],
                                 return_pred=True)
    size = x.abs() + abs(weights[0]) * (x.abs() + sigma * m.abs()) / sigma + sum(
        abs(w) * d.abs() for w, d in zip(weights[1:], earlier))
    check(out, ref, size, rtol, f"lms {len(nodes)} nodes {pred}")
    check(got_x0, x0, x.abs() + sigma * m.abs(), rtol, f"lms x0 {pred}")


def test_wrong_weights_are_caught():
    """The check can fail: the LMS step with its weights in reverse order."""
    nodes = NODES[3]
    x, m, earlier = randn(5), randn(6), [randn(10 + j) for j in range(3)]
    weights = sc.lms_weights(nodes, 0.3)
    ref = x + weights[0] * m + sum(w * d for w, d in zip(weights[1:], earlier))
    coeffs = sc.linear_multistep(nodes[0], weights[::-1])
    out = scheduler_step(x.float(), m.float(), coeffs, history=[d.float() for d in earlier])
    with pytest.raises(AssertionError, match="out of bound"):
        check(out, ref, x.abs() + m.abs(), 1e-5, "reversed weights")


def test_rules_are_registered():
    for name in ("heun", "linear_multistep", "ode_derivative"):
        assert name in sc.RULES
    assert sc.step_coeffs("heun", 3.0, 1.0, second_stage=True) == sc.heun(3.0, 1.0, second_stage=True)
    assert sc.step_coeffs("linear_multistep", 3.0, (0.5, -0.1)) == sc.linear_multistep(3.0, (0.5, -0.1))


def test_errors():
    with pytest.raises(ValueError, match="distinct"):
        sc.lms_weights([1.0, 2.0, 1.0], 0.5)
    with pytest.raises(ValueError, match="1 to 5"):
        sc.lms_weights([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 0.5)
    with pytest.raises(ValueError, match="1 to 5"):
        sc.linear_multistep(1.0, [])
    with pytest.raises(ValueError, match="sigma > 0"):
        sc.ode_derivative(0.0)
    with pytest.raises(ValueError, match="sigma_next > 0"):
        sc.heun(1.0, 0.0, second_stage=True)
    with pytest.raises(ValueError, match="prediction_type"):
        sc.heun(1.0, 0.5, prediction_type="flow")
    with pytest.raises(ValueError, match="clip_sample_range"):
        sc.heun(1.0, 0.5, clip_sample_range=0.0)
