"""The UniPC coefficient functions (kernels/scheduler_step_unipc.py) against the ODE they integrate.

- Accuracy: with the weights a from the linear solve, UniC of order p is exact for a data prediction
  that is a polynomial of degree p in lambda, UniP of order p for degree p - 1 (against Gauss-Legendre
  quadrature of x_t = (sigma_t/sigma_s0) x_s0 + sigma_t int e^lambda x0 dlambda); the fixed a = 1/2 of
  UniC-1 and UniP-2 (diffusers' choice) is second order.
- Composition: unipc_coeffs (corrector and predictor in one step, from the last output) against the
  two-stage definition, in scalars and through the fused op (C++ CPU path, 4 history tensors).
- Limits (h = 0, sigma_t = 0) and errors. Whole runs against diffusers: tests/schedulers/test_unipc_multistep.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fusediff.kernels import scheduler_step, use_backend
from fusediff.kernels.scheduler_step_coeffs import StepCoeffs
from fusediff.kernels.scheduler_step_unipc import Update, unipc_coeffs, unipc_update

SHAPE = (2, 3, 7, 5)  # odd sizes


def _vp(lam: float) -> tuple[float, float]:
    """(alpha, sigma) of a VP process at lambda = log(alpha/sigma)."""
    sigma = 1 / math.sqrt(1 + math.exp(2 * lam))
    return sigma * math.exp(lam), sigma


def _exact_data_ode(lam_s0, lam_t, x_s0, x0_of_lambda):
    """x_t = (sigma_t/sigma_s0) x_s0 + sigma_t int e^lambda x0(lambda) dlambda, the exact solution of the
    data-prediction ODE (Lu et al. 2022, DPM-Solver++), by Gauss-Legendre quadrature."""
    nodes, weights = np.polynomial.legendre.leggauss(40)
    mid, half = (lam_s0 + lam_t) / 2, (lam_t - lam_s0) / 2
    integral = half * sum(w * math.exp(mid + half * u) * x0_of_lambda(mid + half * u) for u, w in zip(nodes, weights))
    return _vp(lam_t)[1] / _vp(lam_s0)[1] * x_s0 + _vp(lam_t)[1] * integral


def _apply(update: Update, x, lam_s, lam_t, x0_of_lambda):
    return (update.c_x * x + sum(c * x0_of_lambda(lam) for c, lam in zip(update.c_m, lam_s))
            + update.c_new * x0_of_lambda(lam_t))


@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("corrector,order,degree", [(True, 2, 2), (True, 3, 3), (False, 3, 2)])
def test_solved_orders_are_exact_for_polynomial_predictions(solver_type, corrector, order, degree):
    """With a from the linear solve, UniC of order p integrates x0 polynomial of degree p in lambda exactly
    (p + 1 points), UniP of order p degree p - 1; B(h) cancels."""
    lam_s, lam_t = [-0.3, -0.75, -1.1][:order], 0.2
    coef = np.random.default_rng(order).normal(size=degree + 1)

    def x0(lam):
        return float(np.polyval(coef, lam))
    update = unipc_update(lam_t, lam_s, *_vp(lam_t), *_vp(lam_s[0]), solver_type=solver_type, corrector=corrector)
    got, want = _apply(update, 0.7, lam_s, lam_t, x0), _exact_data_ode(lam_s[0], lam_t, 0.7, x0)
    assert abs(got - want) < 1e-12, (got, want)


@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("corrector,order", [(True, 1), (False, 2)])
def test_fixed_half_weights_are_second_order(solver_type, corrector, order):
    """UniC-1 and UniP-2 take a = 1/2 (as diffusers): not exact for a linear x0, but the local error
    of a step falls as h^3 (halving h divides it by ~8)."""
    def x0(lam):
        return 0.3 - 1.7 * lam + 0.4 * lam**2

    errors = []
    for h in (0.2, 0.1, 0.05):
        lam_s = [0.0, -h][:order]
        update = unipc_update(h, lam_s, *_vp(h), *_vp(0.0), solver_type=solver_type, corrector=corrector)
        errors.append(abs(_apply(update, 0.7, lam_s, h, x0) - _exact_data_ode(0.0, h, 0.7, x0)))
    for coarse, fine in zip(errors, errors[1:]):
        assert 6 < coarse / fine < 10, errors


def test_coeffs_compose_corrector_and_predictor():
    """unipc_coeffs against the two-stage definition: x^c = UniC(x_s0, D), then UniP(x^c, D)."""
    rng = np.random.default_rng(0)
    last = Update(0.8, tuple(rng.normal(size=3)))
    corrector = Update(0.8, tuple(rng.normal(size=3)), 0.3)
    predictor = Update(0.6, tuple(rng.normal(size=3)))
    x_s0, x, m = rng.normal(size=3)
    d_old = rng.normal(size=3)  # D_{i-1}, D_{i-2}, D_{i-3}
    p_x, p_m = 1.3, -0.4
    d_new = p_x * x + p_m * m
    y = last.c_x * x_s0 + last.c_m @ d_old  # the last step's output
    x_c = corrector.c_x * x_s0 + corrector.c_m @ d_old + corrector.c_new * d_new
    want = predictor.c_x * x_c + predictor.c_m @ np.array([d_new, *d_old[:2]])
    coeffs, n_old = unipc_coeffs(p_x, p_m, predictor, corrector, last)
    assert n_old == 3 and coeffs.c_x == 0
    got = coeffs.c_x0 * d_new + np.dot(coeffs[7:11], [y, *d_old])
    assert abs(got - want) < 1e-12
    first, n_old = unipc_coeffs(p_x, p_m, predictor)
    assert n_old == 2 and first == StepCoeffs(p_x=p_x, p_m=p_m, c_x=0.6, c_x0=predictor.c_m[0],
                                              c_h0=predictor.c_m[1], c_h1=predictor.c_m[2])
    with pytest.raises(ValueError, match="order"):
        unipc_coeffs(p_x, p_m, predictor, corrector, Update(0.8, (1.0,)))


def test_fused_step_composes_corrector_and_predictor():
    """One fused call (C++ CPU path, float32) with the last output and three earlier D in history against
    the two-stage update in float64: D_t, then x^c = UniC(x_s0, D), then x_next = UniP(x^c, D)."""
    lam = [0.9, 0.4, 0.1, -0.3, -0.6]  # lambda_t+1, lambda_t (this step), lambda_s0, s1, s2
    g = torch.Generator().manual_seed(0)
    x_s0, x, m, d0, d1, d2 = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(6))
    last = unipc_update(lam[1], lam[2:], *_vp(lam[1]), *_vp(lam[2]))
    corrector = unipc_update(lam[1], lam[2:], *_vp(lam[1]), *_vp(lam[2]), corrector=True)
    predictor = unipc_update(lam[0], lam[1:4], *_vp(lam[0]), *_vp(lam[1]))
    alpha, sigma = _vp(lam[1])
    p_x, p_m = 1 / alpha, -sigma / alpha  # epsilon -> x0
    y = last.c_x * x_s0 + last.c_m[0] * d0 + last.c_m[1] * d1 + last.c_m[2] * d2
    d_t = p_x * x + p_m * m
    x_c = corrector.c_x * x_s0 + corrector.c_m[0] * d0 + corrector.c_m[1] * d1 + corrector.c_m[2] * d2 \
        + corrector.c_new * d_t
    want = predictor.c_x * x_c + predictor.c_m[0] * d_t + predictor.c_m[1] * d0 + predictor.c_m[2] * d1
    coeffs, n_old = unipc_coeffs(p_x, p_m, predictor, corrector, last)
    with use_backend("fused"):
        f = [t.float() for t in (x, m, y, d0, d1, d2)]
        got, pred = scheduler_step(f[0], f[1], coeffs, history=f[2:2 + 1 + n_old], return_pred=True)
    torch.testing.assert_close(pred.double(), d_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_limits():
    # h = 0 (a final level equal to the last): the update is x itself, of any order
    assert unipc_update(0.5, [0.5, 0.1, -0.2], *_vp(0.5), *_vp(0.5)) == Update(1.0, (0.0, 0.0, 0.0))
    # sigma_t = 0, first order: x0 (data prediction); (x - sigma_s0 eps)/alpha_s0 (noise prediction)
    alpha, sigma = _vp(0.3)
    assert unipc_update(math.inf, [0.3], 1.0, 0.0, alpha, sigma, solver_type="bh1") == Update(0.0, (1.0,))
    u = unipc_update(math.inf, [0.3], 1.0, 0.0, alpha, sigma, predict_x0=False)
    assert u.c_x == pytest.approx(1 / alpha) and u.c_m[0] == pytest.approx(-sigma / alpha)


def test_errors():
    with pytest.raises(ValueError, match="first-order"):
        unipc_update(math.inf, [0.3, 0.1], 1.0, 0.0, *_vp(0.3))
    with pytest.raises(ValueError, match="higher log-SNR"):
        unipc_update(0.1, [0.3], *_vp(0.1), *_vp(0.3))
    with pytest.raises(ValueError, match="solver_type"):
        unipc_update(0.5, [0.3], *_vp(0.5), *_vp(0.3), solver_type="bh3")
    with pytest.raises(ValueError, match="at least"):
        unipc_update(0.5, [], *_vp(0.5), *_vp(0.3))
    order4 = Update(0.9, (0.1, 0.2, 0.3, 0.4), 0.5)
    with pytest.raises(ValueError, match="history"):
        unipc_coeffs(1.0, -1.0, Update(0.9, (0.1, 0.2)), order4, Update(0.9, (0.1, 0.2, 0.3, 0.4)))
