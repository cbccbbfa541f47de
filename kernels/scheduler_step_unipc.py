"""UniPC (Zhao et al. 2023, arXiv:2302.04867) as coefficients of the fused scheduler step.

UniPC steps the diffusion ODE in lambda = log(alpha/sigma), half the log-SNR, from s0 to t,
h = lambda_t - lambda_s0 > 0. With data prediction (x0 models m) and hh = -h, UniP of order p is

    x_t = (sigma_t/sigma_s0) x_s0 - alpha_t (e^hh - 1) m_0 - alpha_t B(h) sum_{k=1}^{p-1} a_k D_k / r_k

where m_k is the prediction at the k-th earlier point s_k (m_0 at s0), r_k = (lambda_{s_k} -
lambda_s0)/h, D_k = m_k - m_0, B(h) = hh ("bh1") or e^hh - 1 ("bh2"), and a solves
R a = g/B(h) with R_{jk} = r_k^j and g_j = hh phi_{j+1}(hh) j! (phi_1(z) = (e^z - 1)/z,
phi_{j+1}(z) = (phi_j(z) - 1/j!)/z). The corrector UniC of order p is the same update with one
more point: the new prediction m_t at t itself, with r_p = 1 and D_p = m_t - m_0. With noise
prediction (eps models), hh = h and alpha, sigma trade places: (alpha_t/alpha_s0) x_s0 - sigma_t ...

Every update is a linear combination of a sample and predictions (:class:`Update`), so a scheduler
step (correct the last result with the new prediction, then predict the next one) is a single
fused call: :func:`unipc_coeffs`. The scalars are computed here in float64. Like diffusers, the
2nd-order predictor and the 1st-order corrector take a = 1/2 rather than the solve's value.

Limits: at most 3 earlier predictions (solver order 3): the fused op reads 4 history tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .scheduler_step_coeffs import MAX_HISTORY, StepCoeffs

SOLVER_TYPES = ("bh1", "bh2")
MAX_ORDER = MAX_HISTORY - 1  # the corrector of order p reads p predictions and the last result


class Update(NamedTuple):
    """x_t = c_x * x + sum_k c_m[k] * m_k + c_new * m_t (m_0 the most recent earlier prediction)."""

    c_x: float
    c_m: tuple[float, ...]
    c_new: float = 0.0


def half_log_snr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha) - log(sigma); +inf at sigma = 0 (the clean end of a run)."""
    return math.inf if sigma == 0 else math.log(alpha) - math.log(sigma)


def b_of_h(hh: float, solver_type: str) -> float:
    """B(h) of UniPC's bh1 (B = hh) and bh2 (B = e^hh - 1) variants (Zhao et al. 2023, sec. 3)."""
    if solver_type == "bh1":
        return hh
    if solver_type == "bh2":
        return math.expm1(hh)
    raise ValueError(f"solver_type must be one of {', '.join(SOLVER_TYPES)}; got {solver_type!r}")


def g_over_b(hh: float, b_h: float, p: int) -> list[float]:
    """g_j / B(h) for j = 1 .. p, with g_j = hh phi_{j+1}(hh) j!, by the recursion of phi_j."""
    h_phi = math.expm1(hh) / hh - 1.0  # hh phi_2(hh)
    factorial, out = 1.0, []
    for j in range(1, p + 1):
        out.append(h_phi * factorial / b_h)
        factorial *= j + 1
        h_phi = h_phi / hh - 1.0 / factorial  # hh phi_{j+2}(hh)
    return out


def unipc_rhos(rks: Sequence[float], hh: float, b_h: float, *, corrector: bool) -> tuple[float, ...]:
    """The weights a_k of D_k/r_k: UniP over the earlier points ``rks`` (r_1 .. r_{p-1}), or UniC
    over those and r_p = 1 (the new prediction's weight last)."""
    if corrector and not rks:
        return (0.5,)
    if not corrector and len(rks) <= 1:
        return (0.5,) * len(rks)
    r = np.array([*rks, 1.0] if corrector else list(rks), dtype=np.float64)  # (p,) or (p-1,)
    vander = r[np.newaxis, :] ** np.arange(len(r))[:, np.newaxis]  # R_{jk} = r_k^j
    rhs = np.array(g_over_b(hh, b_h, len(r)), dtype=np.float64)
    return tuple(float(a) for a in np.linalg.solve(vander, rhs))


def unipc_update(lambda_t: float, lambda_s: Sequence[float], alpha_t: float, sigma_t: float,
                 alpha_s0: float, sigma_s0: float, *, solver_type: str = "bh2", predict_x0: bool = True,
                 corrector: bool = False) -> Update:
    """UniP (or, with ``corrector``, UniC) from s0 to t over the predictions at ``lambda_s``
    (lambda_s0, lambda_s1, ...; the order p is their number). alpha, sigma: x = alpha x0 + sigma eps."""
    p = len(lambda_s)
    if p < 1:
        raise ValueError("a UniPC update needs the prediction at s0 at least")
    h = lambda_t - lambda_s[0]
    if h == 0:  # a zero-length step (a final level equal to the last): the limit h -> 0 is x itself
        return Update(1.0, (0.0,) * p)
    if not h > 0:
        raise ValueError(f"UniPC steps to a higher log-SNR: lambda_t = {lambda_t} < lambda_s0 = {lambda_s[0]}")
    if math.isinf(h) and (p > 1 or corrector):
        raise ValueError("the step to sigma = 0 must be a first-order prediction: higher orders divide by "
                         "r_k = 0 there (use lower_order_final=True, or final_sigmas_type='sigma_min')")
    hh = -h if predict_x0 else h
    b_h = b_of_h(hh, solver_type)
    rks = [(lam - lambda_s[0]) / h for lam in lambda_s[1:]]  # r_k, k = 1 .. p-1
    rhos = unipc_rhos(rks, hh, b_h, corrector=corrector)
    if predict_x0:
        c_x, scale = sigma_t / sigma_s0, alpha_t
    elif math.isinf(h):  # sigma_t (e^h - 1) -> alpha_t sigma_s0 / alpha_s0 as sigma_t -> 0
        return Update(alpha_t / alpha_s0, (-alpha_t * sigma_s0 / alpha_s0,))
    else:
        c_x, scale = alpha_t / alpha_s0, sigma_t
    # x_t = c_x x - scale (e^hh - 1) m_0 - scale B(h) (sum_k a_k (m_k - m_0)/r_k [+ a_p (m_t - m_0)])
    w = [-scale * b_h * a / r for a, r in zip(rhos, rks)]  # weights of m_1 .. m_{p-1}
    c_new = -scale * b_h * rhos[-1] if corrector else 0.0
    c_m0 = -scale * math.expm1(hh) - sum(w) - c_new
    return Update(c_x, (c_m0, *w), c_new)


def unipc_coeffs(p_x: float, p_m: float, predictor: Update, corrector: Update | None = None,
                 last_predictor: Update | None = None) -> tuple[StepCoeffs, int]:
    """One UniPC scheduler step as fused coefficients, and how many earlier predictions it reads.

    The new prediction is m_t = p_x*x + p_m*m (the fused op's x0 output, kept as history).
    Without ``corrector``, ``predictor`` starts from the sample x and the history is (m_0, m_1, ...).
    With it, the start is the corrected x_c = UniC(x_s0, m's, m_t); as the corrector and the last
    step's ``last_predictor`` (which returned y) share every term but the D's,
        x_c = y + (corrector - last_predictor)(m_0, m_1, ..., m_t),
    and the history is (y, m_0, m_1, ...). The predictor's predictions are (m_t, m_0, m_1, ...).
    """
    n_old = len(predictor.c_m) - 1
    if corrector is not None:
        if last_predictor is None or len(last_predictor.c_m) != len(corrector.c_m):
            raise ValueError("a corrected step needs the last step's predictor, of the corrector's order")
        n_old = max(n_old, len(corrector.c_m))
    if n_old + (corrector is not None) > MAX_HISTORY:
        raise ValueError(f"UniPC of order > {MAX_ORDER} needs more than {MAX_HISTORY} history tensors")
    old = [predictor.c_m[k + 1] if k + 1 < len(predictor.c_m) else 0.0 for k in range(n_old)]
    if corrector is None:
        return StepCoeffs(p_x=p_x, p_m=p_m, c_x=predictor.c_x, c_x0=predictor.c_m[0],
                          **{f"c_h{k}": w for k, w in enumerate(old)}), n_old
    # x_next = P.c_x * x_c + P.c_m[0] m_t + sum_k P.c_m[k+1] m_k
    c = predictor.c_x
    diff = [corrector.c_m[k] - last_predictor.c_m[k] if k < len(corrector.c_m) else 0.0 for k in range(n_old)]
    history = [c] + [w + c * d for w, d in zip(old, diff)]
    return StepCoeffs(p_x=p_x, p_m=p_m, c_x0=predictor.c_m[0] + c * corrector.c_new,
                      **{f"c_h{k}": w for k, w in enumerate(history)}), n_old
