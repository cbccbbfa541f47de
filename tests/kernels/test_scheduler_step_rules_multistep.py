"""The multistep rules of scheduler_step_coeffs (dpm_solver_multistep, deis_multistep) against
independent float64 formulas.

- Tensor level: the fused step (reference in float64, and the C++ CPU path in float32) with the rule's
  coefficients against the published update written out with D0, D1, D2 (DPM-Solver++ alg. 2 and its
  order-3 form, the SDE variants, DPM-Solver eq. 3.7) or DEIS' x_t = alpha_t (x/alpha_s + sum_j c_j eps_j).
- Coefficient level: the weights of the D terms against numerical quadrature of the exponential
  integrals (scipy.integrate.quad), from h = 1e-4 (where the closed forms cancel) to h = 3; DEIS' weights
  against quadrature of its Lagrange polynomials in log rho.
- dpm_solver_multistep of order 1 and 2 equals the older dpmpp_2m; limits (h = 0, sigma_t = 0); errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from fusediff.kernels import scheduler_step, scheduler_step_ref, use_backend
from fusediff.kernels import scheduler_step_coeffs as sc

SHAPE = (2, 3, 7, 5)  # odd sizes
PREDS = ("epsilon", "sample", "v_prediction")
ALGOS = sc.DPM_SOLVER_ALGORITHMS
LEVELS = {1: (2.0,), 2: (2.0, 3.1), 3: (2.0, 3.1, 5.7)}  # sigma_s0, s1, s2: most recent (smallest) first
SIGMA_T = 1.3


def tensors(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(n)]


def vp(sigma: float) -> tuple[float, float]:
    a = 1 / math.sqrt(sigma**2 + 1)
    return a, sigma * a


def converted(x, m, sigma, pred, data):
    """x0 (data) or eps of model output m at VE level sigma, in float64, written from x = alpha x0 + s eps."""
    a, s = vp(sigma)
    x0 = {"epsilon": (x - s * m) / a, "sample": m, "v_prediction": a * x - s * m}[pred]
    return x0 if data else (x - a * x0) / s


def differences(ms, lambdas, h):
    """D0, D1, D2 of the multistep DPM-Solvers, written out (Lu et al. 2022, arXiv:2211.01095)."""
    if len(ms) == 1:
        return ms[0], None, None
    r0 = (lambdas[0] - lambdas[1]) / h
    d1_0 = (ms[0] - ms[1]) / r0
    if len(ms) == 2:
        return ms[0], d1_0, None
    r1 = (lambdas[1] - lambdas[2]) / h
    d1_1 = (ms[1] - ms[2]) / r1
    return ms[0], d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)


def dpm_reference(x, ms, z, sigma_t, levels, algo, solver_type):
    """The published multistep update on tensors (np.exp, no cancellation-free forms); ms[0] is this step's D."""
    at, st = vp(sigma_t)
    a0, s0 = vp(levels[0])
    lam = [-math.log(s) for s in levels]
    h = -math.log(sigma_t) - lam[0]
    d0, d1, d2 = differences(ms, lam, h)
    e, order = math.exp, len(levels)
    if algo == "dpmsolver++":
        out = st / s0 * x - at * (e(-h) - 1) * d0
        if order == 2 and solver_type == "midpoint":
            out = out - 0.5 * at * (e(-h) - 1) * d1
        elif order >= 2:
            out = out + at * ((e(-h) - 1) / h + 1) * d1
        if order == 3:
            out = out - at * ((e(-h) - 1 + h) / h**2 - 0.5) * d2
    elif algo == "sde-dpmsolver++":
        out = st / s0 * e(-h) * x + at * (1 - e(-2 * h)) * d0 + st * math.sqrt(1 - e(-2 * h)) * z
        if order == 2 and solver_type == "midpoint":
            out = out + 0.5 * at * (1 - e(-2 * h)) * d1
        elif order >= 2:
            out = out + at * ((1 - e(-2 * h)) / (-2 * h) + 1) * d1
        if order == 3:  # the exact integral of the quadratic term (diffusers has - 0.5 here)
            out = out + at * ((1 - e(-2 * h) - 2 * h) / (2 * h) ** 2 + 0.5) * d2
    else:
        k = 2.0 if algo == "sde-dpmsolver" else 1.0
        out = at / a0 * x - k * st * (e(h) - 1) * d0
        if order == 2 and solver_type == "midpoint":
            out = out - 0.5 * k * st * (e(h) - 1) * d1
        elif order >= 2:
            out = out - k * st * ((e(h) - 1) / h - 1) * d1
        if order == 3:
            out = out - st * ((e(h) - 1 - h) / h**2 - 0.5) * d2
        if algo == "sde-dpmsolver":
            out = out + st * math.sqrt(e(2 * h) - 1) * z
    return out


DPM_CASES = [(algo, order, solver, pred) for algo in ALGOS for order in (1, 2, 3) for solver in ("midpoint", "heun")
             for pred in PREDS
             if not (algo == "sde-dpmsolver" and order == 3) and not (order != 2 and solver == "heun")]


@pytest.mark.parametrize("algo,order,solver,pred", DPM_CASES)
def test_dpm_solver_multistep_matches_published_update(algo, order, solver, pred):
    x, m, h0, h1, z = tensors(5)
    levels = LEVELS[order]
    coeffs = sc.dpm_solver_multistep(SIGMA_T, levels, prediction_type=pred, algorithm_type=algo, solver_type=solver)
    history = [h0, h1][:order - 1]
    out, d = scheduler_step_ref(x, m, coeffs, noise=z, history=history, return_pred=True)
    d_ref = converted(x, m, levels[0], pred, algo.endswith("++"))
    ref = dpm_reference(x, [d_ref, *history], z, SIGMA_T, levels, algo, solver)
    torch.testing.assert_close(d, d_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    if algo.startswith("sde"):
        assert coeffs.c_n > 0
    else:
        assert coeffs.c_n == 0


@pytest.mark.parametrize("backend", ["fused", "ref"])
def test_float32_paths_agree_with_float64(backend):
    x, m, h0, h1 = tensors(4, seed=1)
    coeffs = sc.dpm_solver_multistep(SIGMA_T, LEVELS[3], prediction_type="v_prediction")
    ref = scheduler_step_ref(x, m, coeffs, history=[h0, h1])
    with use_backend(backend):
        out = scheduler_step(*(t.float() for t in (x, m)), coeffs, history=[h0.float(), h1.float()])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def integral(f, a, b):
    value, err = quad(f, a, b, epsabs=0, epsrel=1e-13, limit=200)
    return value


@pytest.mark.parametrize("h", [1e-4, 0.05, 0.7, 3.0])
@pytest.mark.parametrize("algo", ALGOS)
def test_dpm_weights_are_the_exponential_integrals(algo, h):
    """a_k = the integral of the linear part's kernel against the k-th Taylor term (u/h)^k / k! of D."""
    order = 2 if algo == "sde-dpmsolver" else 3
    s0 = 2.0
    sigma_t = s0 * math.exp(-h)  # lambda_t - lambda_s0 = h
    levels = (s0, s0 * math.exp(0.8 * h), s0 * math.exp(2.1 * h))[:order]
    at, st = vp(sigma_t)
    if algo == "dpmsolver++":
        kernel = lambda u: at * math.exp(-(h - u))  # noqa: E731
    elif algo == "sde-dpmsolver++":
        kernel = lambda u: 2 * at * math.exp(-2 * (h - u))  # noqa: E731
    else:
        k = 2.0 if algo == "sde-dpmsolver" else 1.0
        kernel = lambda u: -k * st * math.exp(h - u)  # noqa: E731
    a = [integral(lambda u, j=j: kernel(u) * (u / h) ** j / math.factorial(j), 0, h) for j in range(order)]
    lam = [-math.log(s) for s in levels]
    basis = [torch.eye(3, dtype=torch.float64)[j] for j in range(order)]
    d = [t for t in differences(basis, lam, h) if t is not None]
    expected = sum(aj * dj for aj, dj in zip(a, d))
    coeffs = sc.dpm_solver_multistep(sigma_t, levels, algorithm_type=algo, solver_type="heun")
    got = torch.tensor([coeffs.c_x0, coeffs.c_h0, coeffs.c_h1], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-14 * abs(a[0]) + 1e-300)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("pred", PREDS)
def test_deis_multistep_matches_quadrature(order, pred):
    levels, sigma_t = LEVELS[order], SIGMA_T
    at, _ = vp(sigma_t)
    a0, _ = vp(levels[0])
    nodes = [math.log(s) for s in levels]

    def basis(j, u):  # Lagrange basis polynomial in u = log rho, 1 at nodes[j]
        return math.prod((u - nodes[k]) / (nodes[j] - nodes[k]) for k in range(order) if k != j)
    c = [integral(lambda r, j=j: basis(j, math.log(r)), levels[0], sigma_t) for j in range(order)]
    x, m, h0, h1 = tensors(4, seed=2)
    history = [h0, h1][:order - 1]
    eps = converted(x, m, levels[0], pred, data=False)
    ref = at * (x / a0 + sum(cj * e for cj, e in zip(c, [eps, *history])))
    coeffs = sc.deis_multistep(sigma_t, levels, prediction_type=pred)
    out, d = scheduler_step_ref(x, m, coeffs, history=history, return_pred=True)
    torch.testing.assert_close(d, eps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("solver", ["midpoint", "heun"])
def test_orders_1_and_2_equal_dpmpp_2m(pred, solver):
    for args in ((1.3, 2.0, None), (1.3, 2.0, 3.1), (0.0, 2.0, None)):
        old = sc.dpmpp_2m(*args, prediction_type=pred, solver_type=solver)
        levels = [s for s in args[1:] if s is not None]
        new = sc.dpm_solver_multistep(args[0], levels, prediction_type=pred, solver_type=solver)
        np.testing.assert_allclose(new, old, rtol=1e-13, atol=1e-15, err_msg=str(args))


def test_limits():
    assert sc.dpm_solver_multistep(2.0, [2.0, 3.0, 4.0]).c_x == 1.0  # h = 0: no step
    assert sc.dpm_solver_multistep(2.0, [2.0, 3.0, 4.0])[3:] == sc.StepCoeffs(c_x=1.0)[3:]
    step = sc.dpm_solver_multistep(0.0, [0.5], algorithm_type="sde-dpmsolver++")  # to sigma 0: x0 itself
    assert (step.c_x, step.c_x0, step.c_n) == (0.0, 1.0, 0.0)
    deis = sc.deis_multistep(0.0, [0.5, 0.9])  # rho_t = 0: the integrals' lower limit is 0
    a0, s0 = vp(0.5)
    assert math.isclose(deis.c_x, 1 / a0) and all(math.isfinite(c) for c in deis)
    for x in (0.3, -0.999999, 1.000001, -2.5):  # the series and closed form agree across |x| = 1
        assert math.isclose(sc._phi_tail(1, x), math.expm1(x) / x - 1, rel_tol=1e-12)
        assert math.isclose(sc._phi_tail(2, x), (math.expm1(x) - x) / x**2 - 0.5, rel_tol=1e-10)
    # near 0 the closed forms cancel; the series keeps the leading terms x/2 + x^2/6 and x/6 + x^2/24
    assert math.isclose(sc._phi_tail(1, 1e-9), 0.5e-9 + 1e-18 / 6, rel_tol=1e-15)
    assert math.isclose(sc._phi_tail(2, -1e-9), -1e-9 / 6 + 1e-18 / 24, rel_tol=1e-15)
    assert sc.step_coeffs("dpm_solver_multistep", 1.3, [2.0]) == sc.dpm_solver_multistep(1.3, [2.0])
    assert sc.RULES["deis_multistep"] is sc.deis_multistep


def test_errors():
    with pytest.raises(ValueError, match="algorithm_type"):
        sc.dpm_solver_multistep(1.0, [2.0], algorithm_type="dpm")
    with pytest.raises(ValueError, match="solver_type"):
        sc.dpm_solver_multistep(1.0, [2.0], solver_type="rk")
    with pytest.raises(ValueError, match="1 to 3"):
        sc.dpm_solver_multistep(1.0, [2.0, 3.0, 4.0, 5.0])
    with pytest.raises(ValueError, match="1 to 3"):
        sc.deis_multistep(1.0, [])
    with pytest.raises(ValueError, match="third-order"):
        sc.dpm_solver_multistep(1.0, [2.0, 3.0, 4.0], algorithm_type="sde-dpmsolver")
    with pytest.raises(ValueError, match="first order"):
        sc.dpm_solver_multistep(0.0, [2.0, 3.0])
    with pytest.raises(ValueError, match="first order"):
        sc.dpm_solver_multistep(0.0, [2.0], algorithm_type="dpmsolver")
    with pytest.raises(ValueError, match="> 0"):
        sc.deis_multistep(1.0, [2.0, -3.0])
    with pytest.raises(ValueError, match="prediction_type"):
        sc.deis_multistep(1.0, [2.0], prediction_type="flow")
