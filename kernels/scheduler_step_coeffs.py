"""Scheduler update rules as coefficients of the fused scheduler step.

Every supported update is, per element, the same small formula (csrc/scheduler_step.h):

    n   = n * exp(V_A + V_B*v)                    only with a per-element variance input v
    x0  = P_X*x + P_M*m + P_N*n                  predicted clean sample
    x0  = clamp(x0, -clip, clip)                  when clip > 0 (or dynamic thresholding: an op argument)
    out = C_X*x + C_M*m + C_N*n + C_X0*x0 + sum_j C_H[j]*h_j

with x the sample, m the model output, n the noise, v a per-element variance input (DDPM's
learned_range: :func:`ddpm_learned_range`) and h_j what a rule keeps between steps:
earlier model outputs (PLMS), earlier x0 predictions (DPM-Solver(++), DEIS), earlier ODE
derivatives (LMS), or the first stage's sample and x0 (Heun's second stage). UniPC's
predictor-corrector coefficients are in :mod:`scheduler_step_unipc`. Each function below maps one rule's scalars to a
:class:`StepCoeffs`; they are small pure functions of Python floats, so a scheduler can build
a whole table of steps up front. Notation: ``alpha_prod_t`` is the cumulative product
alpha-bar_t of DDPM (Ho et al. 2020, eq. 4); ``sigma`` is the noise level of the variance-
exploding view x = x0 + sigma*eps (Karras et al. 2022), sigma^2 = (1 - alpha-bar)/alpha-bar.

Limits: a per-element noise scale must be exp of an affine function of v (learned_range is;
DDPM's ``learned``, sigma = sqrt(v), is not, and is folded into the noise by the scheduler).
Per-sample dynamic thresholding is not a coefficient but an argument of the op. What lives here and what in :mod:`fusediff.schedulers` (tables, timesteps, state, which rule a
step uses) is set out in that package's docstring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

NUM_COEFFS = 14  # length of the coefficient vector (csrc/scheduler_step.h, kNumCoeffs)
MAX_HISTORY = 4  # history tensors the fused step reads at most
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class StepCoeffs(NamedTuple):
    """Coefficients of one fused update, as the 14-tuple the kernels read (csrc/scheduler_step.h).

    Being a tuple, it goes to the kernels as it is; build it with the rule functions below
    or by keyword (unnamed coefficients are 0).
    """

    p_x: float = 0.0  # x0 <- sample
    p_m: float = 0.0  # x0 <- model output
    p_n: float = 0.0  # x0 <- noise
    c_x: float = 0.0  # out <- sample
    c_m: float = 0.0  # out <- model output
    c_n: float = 0.0  # out <- noise
    c_x0: float = 0.0  # out <- x0 after clipping
    c_h0: float = 0.0  # out <- history[0], the most recent
    c_h1: float = 0.0  # out <- history[1]
    c_h2: float = 0.0  # out <- history[2]
    c_h3: float = 0.0  # out <- history[3]
    clip: float = 0.0  # clip range of x0; 0 (or less) disables clipping
    v_a: float = 0.0  # noise scale exp(v_a + v_b*v), used only when the op gets a variance input v
    v_b: float = 0.0

    def as_list(self) -> list[float]:
        """The 14 coefficients as floats, in the order the kernels read them."""
        return [float(v) for v in self]

    def to_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The coefficients as a float32 tensor of shape (14,), e.g. for a CUDA-graph step."""
        return torch.tensor(self, dtype=torch.float32, device=device)


def _history(weights: Sequence[float]) -> dict[str, float]:
    if len(weights) > MAX_HISTORY:
        raise ValueError(f"at most {MAX_HISTORY} history coefficients, got {len(weights)}")
    return {f"c_h{j}": float(w) for j, w in enumerate(weights)}


def _check_prediction(prediction_type: str, allowed: Sequence[str] = PREDICTION_TYPES) -> None:
    if prediction_type not in allowed:
        raise ValueError(f"prediction_type must be one of {', '.join(allowed)}; got {prediction_type!r}")


def _clip(clip_sample_range: float | None) -> float:
    if clip_sample_range is None:
        return 0.0
    if not clip_sample_range > 0:
        raise ValueError(f"clip_sample_range must be > 0 or None; got {clip_sample_range}")
    return float(clip_sample_range)


def prediction_coeffs(alpha: float, sigma: float, prediction_type: str, predict_x0: bool = True
                      ) -> tuple[float, float]:
    """(coef of x, coef of m) of the data prediction x0 (``predict_x0``) or of the noise eps, for
    x = alpha*x0 + sigma*eps and a model output m of ``prediction_type`` (Salimans & Ho 2022 for v)."""
    if prediction_type == "epsilon":  # x0 = (x - sigma*m)/alpha
        return (1.0 / alpha, -sigma / alpha) if predict_x0 else (0.0, 1.0)
    if prediction_type == "sample":  # eps = (x - alpha*m)/sigma
        return (0.0, 1.0) if predict_x0 else (1.0 / sigma, -alpha / sigma)
    if prediction_type == "v_prediction":  # x0 = alpha*x - sigma*v, eps = alpha*v + sigma*x
        return (alpha, -sigma) if predict_x0 else (sigma, alpha)
    raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {prediction_type!r}")


def ddpm(alpha_prod_t: float, alpha_prod_t_prev: float, *, prediction_type: str = "epsilon",
         noise_std: float = 0.0, clip_sample_range: float | None = None) -> StepCoeffs:
    """DDPM ancestral step, posterior mean (Ho et al. 2020, eq. 7) plus noise_std * noise."""
    _check_prediction(prediction_type)
    p_x, p_m = prediction_coeffs(math.sqrt(alpha_prod_t), math.sqrt(1 - alpha_prod_t), prediction_type)
    beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    # 1. mu_t(x_t, x0) = c_x0 * x0 + c_x * x_t (eq. 7)
    c_x0 = math.sqrt(alpha_prod_t_prev) * (1 - current_alpha_t) / beta_prod_t
    c_x = math.sqrt(current_alpha_t) * beta_prod_t_prev / beta_prod_t
    # 2. x_{t-1} = mu_t + sigma_t * z
    return StepCoeffs(p_x=p_x, p_m=p_m, c_x=c_x, c_x0=c_x0, c_n=noise_std, clip=_clip(clip_sample_range))


def ddpm_noise_std(alpha_prod_t: float, alpha_prod_t_prev: float, variance_type: str = "fixed_small") -> float:
    """Standard deviation of DDPM's added noise for the fixed variance types (Ho et al. 2020, sec. 3.2)."""
    current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
    if variance_type in ("fixed_small", "fixed_small_log"):  # beta-tilde_t
        return math.sqrt(max((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, 1e-20))
    if variance_type == "fixed_large":  # beta_t
        return math.sqrt(current_beta_t)
    raise ValueError(f"variance_type must be fixed_small, fixed_small_log or fixed_large; got {variance_type!r}")


def learned_range(min_log: float, max_log: float) -> tuple[float, float]:
    """(v_a, v_b) of the noise scale sigma = exp(v_a + v_b*v) of a log-variance interpolated by v in [-1, 1]
    (Nichol & Dhariwal 2021, eq. 15): log sigma^2 = f max_log + (1 - f) min_log with f = (v + 1)/2, so
    log sigma = (max_log + min_log)/4 + (max_log - min_log)/4 * v."""
    return 0.25 * (max_log + min_log), 0.25 * (max_log - min_log)


def ddpm_learned_range(alpha_prod_t: float, alpha_prod_t_prev: float) -> tuple[float, float]:
    """(v_a, v_b) of DDPM's learned_range noise scale: :func:`learned_range` between log beta-tilde_t
    (clamped at 1e-20 before its log, as diffusers does) and log beta_t of the step."""
    current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
    min_log = math.log(max((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, 1e-20))
    return learned_range(min_log, math.log(current_beta_t))


def ddim(alpha_prod_t: float, alpha_prod_t_prev: float, *, eta: float = 0.0,
         prediction_type: str = "epsilon", clip_sample_range: float | None = None,
         use_clipped_model_output: bool = False) -> StepCoeffs:
    """DDIM step (Song et al. 2021, eq. 12); eta=0 is deterministic, eta=1 is DDPM-like."""
    _check_prediction(prediction_type)
    a, s = math.sqrt(alpha_prod_t), math.sqrt(1 - alpha_prod_t)
    (p_x, p_m), (e_x, e_m) = prediction_coeffs(a, s, prediction_type), prediction_coeffs(a, s, prediction_type, False)
    # 1. sigma_t(eta) (eq. 16)
    variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std = eta * math.sqrt(max(variance, 0.0))
    # 2. "direction pointing to x_t": sqrt(1 - alpha_prev - sigma_t^2) * eps
    direction = math.sqrt(max(1 - alpha_prod_t_prev - std**2, 0.0))
    c_x0 = math.sqrt(alpha_prod_t_prev)
    if use_clipped_model_output:  # eps re-derived from the clipped x0: (x - a*x0)/s
        c_x, c_m, c_x0 = direction / s, 0.0, c_x0 - direction * a / s
    else:
        c_x, c_m = direction * e_x, direction * e_m
    # 3. x_{t-1} = sqrt(alpha_prev) * x0 + direction + sigma_t * z
    return StepCoeffs(p_x=p_x, p_m=p_m, c_x=c_x, c_m=c_m, c_x0=c_x0, c_n=std, clip=_clip(clip_sample_range))


def _ve_x0(sigma: float, prediction_type: str) -> tuple[float, float]:
    """x0 as (coef of x, coef of m) for an unscaled sample x = x0 + sigma*eps."""
    if prediction_type == "epsilon":
        return 1.0, -sigma
    if prediction_type == "sample":
        return 0.0, 1.0
    return 1.0 / (sigma**2 + 1), -sigma / math.sqrt(sigma**2 + 1)  # v-prediction


def euler(sigma: float, sigma_next: float, *, prediction_type: str = "epsilon", gamma: float = 0.0,
          s_noise: float = 1.0) -> StepCoeffs:
    """Euler step of the probability-flow ODE with optional churn (Karras et al. 2022, alg. 2)."""
    _check_prediction(prediction_type)
    # 1. churn: sigma_hat = sigma*(1 + gamma), x_hat = x + sqrt(sigma_hat^2 - sigma^2) * s_noise * z
    sigma_hat = sigma * (gamma + 1)
    k = s_noise * math.sqrt(max(sigma_hat**2 - sigma**2, 0.0)) if gamma > 0 else 0.0
    # 2. x0 from x_hat (v-prediction keeps the un-churned sigma, as diffusers does)
    p_x, p_m = (1.0, -sigma_hat) if prediction_type == "epsilon" else _ve_x0(sigma, prediction_type)
    # 3. d = (x_hat - x0)/sigma_hat; x_next = x_hat + (sigma_next - sigma_hat) * d
    r = (sigma_next - sigma_hat) / sigma_hat
    return StepCoeffs(p_x=p_x, p_m=p_m, p_n=p_x * k, c_x=1 + r, c_n=(1 + r) * k, c_x0=-r)


def euler_ancestral(sigma_from: float, sigma_to: float, *, prediction_type: str = "epsilon") -> StepCoeffs:
    """Euler ancestral step: deterministic to sigma_down, then noise of sigma_up (k-diffusion)."""
    _check_prediction(prediction_type)
    sigma_up = math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2)
    sigma_down = math.sqrt(sigma_to**2 - sigma_up**2)
    p_x, p_m = _ve_x0(sigma_from, prediction_type)
    r = (sigma_down - sigma_from) / sigma_from
    return StepCoeffs(p_x=p_x, p_m=p_m, c_x=1 + r, c_x0=-r, c_n=sigma_up)


def vp_from_sigma(sigma: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) of the variance-preserving view of noise level sigma."""
    alpha = 1.0 / math.sqrt(sigma**2 + 1)
    return alpha, sigma * alpha


def dpmpp_2m(sigma_t: float, sigma_s0: float, sigma_s1: float | None = None, *,
             prediction_type: str = "epsilon", solver_type: str = "midpoint",
             clip_sample_range: float | None = None) -> StepCoeffs:
    """DPM-Solver++(2M) step from sigma_s0 to sigma_t (Lu et al. 2022, alg. 2), x0 optionally clipped.

    ``sigma_s1`` is the previous step's noise level; history[0] must then hold the previous
    x0 prediction (written by the previous step's ``return_pred``). Without it, the step is
    first order (DPM-Solver++ 1, i.e. DDIM in x0 form). It is :func:`dpm_solver_multistep` of
    order 1 or 2 with algorithm ``dpmsolver++``.
    """
    sigmas = (sigma_s0,) if sigma_s1 is None else (sigma_s0, sigma_s1)
    coeffs = dpm_solver_multistep(sigma_t, sigmas, prediction_type=prediction_type, solver_type=solver_type)
    return coeffs._replace(clip=_clip(clip_sample_range))


def plms_weights(order: int) -> tuple[float, ...]:
    """Adams-Bashforth weights of the current and earlier model outputs (Liu et al. 2022, eq. 12)."""
    table = {
        1: (1.0,),
        2: (3 / 2, -1 / 2),
        3: (23 / 12, -16 / 12, 5 / 12),
        4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
    }
    if order not in table:
        raise ValueError(f"PLMS order must be 1, 2, 3 or 4; got {order}")
    return table[order]


def pndm(alpha_prod_t: float, alpha_prod_t_prev: float, weights: Sequence[float] = (1.0,), *,
         prediction_type: str = "epsilon") -> StepCoeffs:
    """PNDM transfer step phi(x, eps, t, t_prev) (Liu et al. 2022, eq. 11) on a combined eps.

    ``weights[0]`` weighs the current model output and ``weights[1:]`` the history (most
    recent first): ``plms_weights(k)`` for PLMS, (1/6, 1/3, 1/3, 1/6)-style sums for PRK.
    """
    _check_prediction(prediction_type, ("epsilon", "v_prediction"))
    if not 1 <= len(weights) <= MAX_HISTORY + 1:
        raise ValueError(f"pndm takes 1 to {MAX_HISTORY + 1} weights; got {len(weights)}")
    a, s = math.sqrt(alpha_prod_t), math.sqrt(1 - alpha_prod_t)
    # 1. x_prev = sqrt(a_prev/a_t) x - (a_prev - a_t) / denom * eps
    sample_coeff = math.sqrt(alpha_prod_t_prev / alpha_prod_t)
    denom = alpha_prod_t * math.sqrt(1 - alpha_prod_t_prev) + math.sqrt(
        alpha_prod_t * (1 - alpha_prod_t) * alpha_prod_t_prev)
    g = (alpha_prod_t_prev - alpha_prod_t) / denom
    # 2. eps = sum_j w_j m_j, or for v-prediction a * sum_j w_j v_j + s * x
    scale, c_x = (1.0, sample_coeff) if prediction_type == "epsilon" else (a, sample_coeff - g * s)
    return StepCoeffs(c_x=c_x, c_m=-g * scale * weights[0], **_history([-g * scale * w for w in weights[1:]]))


# -- multistep exponential integrators: DPM-Solver(++) and DEIS ---------------------------------
# A step from noise level sigma_s0 to sigma_t combines the converted output D0 of this step (the
# x0 slot: data prediction x0 for DPM-Solver++, noise prediction eps for DPM-Solver and DEIS) with
# those of the previous steps at sigma_s1, sigma_s2 (history[0], history[1]). sigma is the VE level
# sqrt((1 - abar)/abar); its VP pair is alpha = 1/sqrt(sigma^2 + 1), sigma_vp = sigma*alpha, and
# lambda = log(alpha/sigma_vp) = -log(sigma).
DPM_SOLVER_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")


def _phi_tail(k: int, x: float) -> float:
    """phi_k(x) - 1/k!, where phi_k(x) = sum_j x^j/(j + k)! (phi_1 = (e^x - 1)/x, phi_2 = (e^x - 1 - x)/x^2);
    a series for |x| < 1, where the closed form cancels (Lu et al. 2022, arXiv:2206.00927, sec. 3.3)."""
    if abs(x) < 1.0:
        term, total = 1.0 / math.factorial(k), 0.0
        for j in range(1, 24):  # |x|^23 / 25! < 1e-25
            term *= x / (j + k)
            total += term
        return total
    if k == 1:
        return math.expm1(x) / x - 1.0
    return (math.expm1(x) - x) / (x * x) - 0.5


def _dpm_differences(lambdas: Sequence[float], h: float) -> list[list[float]]:
    """D0, D1 (and D2) of the multistep DPM-Solvers as weights of (m0, m1, m2), from the lambdas of
    the last steps (most recent first) and the step size h (Lu et al. 2022, arXiv:2211.01095, alg. 2)."""
    order = len(lambdas)
    d0 = [1.0, 0.0, 0.0]
    if order == 1:
        return [d0]
    r0 = (lambdas[0] - lambdas[1]) / h  # ratio of the previous step size to this one
    d1_0 = [1.0 / r0, -1.0 / r0, 0.0]  # (m0 - m1)/r0
    if order == 2:
        return [d0, d1_0]
    r1 = (lambdas[1] - lambdas[2]) / h
    d1_1 = [0.0, 1.0 / r1, -1.0 / r1]  # (m1 - m2)/r1
    d1 = [a + r0 / (r0 + r1) * (a - b) for a, b in zip(d1_0, d1_1)]
    d2 = [(a - b) / (r0 + r1) for a, b in zip(d1_0, d1_1)]
    return [d0, d1, d2]


def dpm_solver_multistep(sigma_t: float, sigmas: Sequence[float], *, prediction_type: str = "epsilon",
                         algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint") -> StepCoeffs:
    """Multistep DPM-Solver(++) step of order len(sigmas) from sigmas[0] to sigma_t.

    ``sigmas`` are the levels of this step and the previous ones, most recent first; history[j] must
    hold the converted output of the step at sigmas[j + 1]. With h = lambda_t - lambda_s0 and D0, D1, D2
    the divided differences of ``_dpm_differences``:
      dpmsolver++ (Lu et al. 2022, arXiv:2211.01095, eq. 9 and alg. 2):
        x_t = (sigma_t/sigma_s0) x + alpha_t (1 - e^-h) D0 + a1 D1 + a2 D2
      sde-dpmsolver++ (the same paper, SDE variant): h -> 2h in the D terms, x scaled by e^-h, plus
        sigma_t sqrt(1 - e^-2h) z
      dpmsolver, sde-dpmsolver (Lu et al. 2022, arXiv:2206.00927, eq. 3.7; D = eps):
        x_t = (alpha_t/alpha_s0) x - sigma_t (e^h - 1) D0 + ... (doubled D terms and noise for the SDE)
    a1 is -a0/2 for the midpoint solver type and the exact integral of the linear term for heun (and
    for order 3). A step to sigma_t = 0 must be first order; there x_t = x0 (data prediction only).
    """
    _check_prediction(prediction_type)
    if algorithm_type not in DPM_SOLVER_ALGORITHMS:
        raise ValueError(f"algorithm_type must be one of {', '.join(DPM_SOLVER_ALGORITHMS)}; got {algorithm_type!r}")
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be midpoint or heun; got {solver_type!r}")
    order = len(sigmas)
    if not 1 <= order <= 3:
        raise ValueError(f"dpm_solver_multistep takes 1 to 3 sigmas (its order); got {order}")
    if order == 3 and algorithm_type == "sde-dpmsolver":
        raise ValueError("sde-dpmsolver has no third-order update; use solver_order <= 2")
    if sigma_t < 0 or any(not s > 0 for s in sigmas):
        raise ValueError(f"noise levels must be > 0 (sigma_t >= 0); got sigma_t={sigma_t}, sigmas={list(sigmas)}")
    data = algorithm_type.endswith("++")
    alpha_s0, vsig_s0 = vp_from_sigma(sigmas[0])
    (x0_x, x0_m), (e_x, e_m) = (prediction_coeffs(alpha_s0, vsig_s0, prediction_type),
                                prediction_coeffs(alpha_s0, vsig_s0, prediction_type, False))
    p_x, p_m = (x0_x, x0_m) if data else (e_x, e_m)
    if sigma_t == 0:  # h = inf: x_t = x0 (the limit of the first-order step)
        if not data or order > 1:
            raise ValueError("a step to sigma_t = 0 must be first order with a data-prediction algorithm "
                             "(dpmsolver++ or sde-dpmsolver++)")
        return StepCoeffs(p_x=p_x, p_m=p_m, c_x0=1.0)
    alpha_t, vsig_t = vp_from_sigma(sigma_t)
    lambdas = [-math.log(s) for s in sigmas]
    h = -math.log(sigma_t) - lambdas[0]
    if h == 0:  # no step
        return StepCoeffs(p_x=p_x, p_m=p_m, c_x=1.0)
    sde = algorithm_type.startswith("sde")
    noise = 0.0
    # 1. the weights a0, a1, a2 of D0, D1, D2 and the coefficient of x
    if data:
        g = 2.0 * h if sde else h  # the SDE's D integrals are the ODE's with 2h
        c_x = vsig_t / vsig_s0 * (math.exp(-h) if sde else 1.0)
        a0 = -alpha_t * math.expm1(-g)  # alpha_t (1 - e^-g)
        a1_exact, a2 = -alpha_t * _phi_tail(1, -g), -alpha_t * _phi_tail(2, -g)
        if sde:
            noise = vsig_t * math.sqrt(-math.expm1(-2.0 * h))
    else:
        k = 2.0 if sde else 1.0  # the SDE doubles the D terms
        c_x = alpha_t / alpha_s0
        a0 = -k * vsig_t * math.expm1(h)
        a1_exact, a2 = -k * vsig_t * _phi_tail(1, h), -k * vsig_t * _phi_tail(2, h)
        if sde:
            noise = vsig_t * math.sqrt(math.expm1(2.0 * h))
    a1 = 0.5 * a0 if (order == 2 and solver_type == "midpoint") else a1_exact
    # 2. x_t = c_x x + a0 D0 + a1 D1 + a2 D2 with each D a combination of (m0, m1, m2)
    weights = [0.0, 0.0, 0.0]
    for a, d in zip((a0, a1, a2), _dpm_differences(lambdas, h)):
        weights = [w + a * dj for w, dj in zip(weights, d)]
    return StepCoeffs(p_x=p_x, p_m=p_m, c_x=c_x, c_n=noise, c_x0=weights[0], c_h0=weights[1], c_h1=weights[2])


def _deis_antiderivative(rho: float, nodes: Sequence[float]) -> float:
    """F(rho) with dF/drho = l(log rho), l the Lagrange basis polynomial in u = log rho that is 1 at u = nodes[0]
    and 0 at the other nodes (1 to 3 of them); F(0) = 0."""
    if rho == 0:
        return 0.0
    u = math.log(rho)
    if len(nodes) == 1:
        return rho
    if len(nodes) == 2:  # l(u) = (u - c)/(b - c); int (u - c) e^u du = e^u (u - c - 1)
        b, c = nodes
        return rho * (u - c - 1.0) / (b - c)
    b, c, d = nodes  # l(u) = (u - c)(u - d)/((b - c)(b - d)); int (u-c)(u-d) e^u du = e^u ((u-c)(u-d) - (2u-c-d) + 2)
    return rho * ((u - c) * (u - d) - (2.0 * u - c - d) + 2.0) / ((b - c) * (b - d))


def deis_multistep(sigma_t: float, sigmas: Sequence[float], *, prediction_type: str = "epsilon") -> StepCoeffs:
    """DEIS step (log-rho, Zhang & Chen 2023, arXiv:2204.13902, eq. 15) of order len(sigmas) to sigma_t.

    In rho = sigma (the VE level, sigma_vp/alpha) the probability-flow ODE is d(x/alpha) = eps drho, and
    eps is interpolated by a polynomial in log rho through the current and earlier noise predictions:
        x_t = alpha_t (x/alpha_s0 + sum_j c_j eps_j),  c_j = int_{rho_s0}^{rho_t} l_j(log rho) drho
    ``sigmas`` are the levels of this step and the previous ones, most recent first; history[j] must hold
    the noise prediction of the step at sigmas[j + 1].
    """
    _check_prediction(prediction_type)
    order = len(sigmas)
    if not 1 <= order <= 3:
        raise ValueError(f"deis_multistep takes 1 to 3 sigmas (its order); got {order}")
    if sigma_t < 0 or any(not s > 0 for s in sigmas):
        raise ValueError(f"noise levels must be > 0 (sigma_t >= 0); got sigma_t={sigma_t}, sigmas={list(sigmas)}")
    alpha_s0, vsig_s0 = vp_from_sigma(sigmas[0])
    p_x, p_m = prediction_coeffs(alpha_s0, vsig_s0, prediction_type, predict_x0=False)
    alpha_t, _ = vp_from_sigma(sigma_t)
    logs = [math.log(s) for s in sigmas]
    # 1. c_j: the integral of the j-th Lagrange basis polynomial (node j first) from rho_s0 to rho_t
    weights = []
    for j in range(order):
        nodes = [logs[j]] + logs[:j] + logs[j + 1:]
        weights.append(alpha_t * (_deis_antiderivative(sigma_t, nodes) - _deis_antiderivative(sigmas[0], nodes)))
    # 2. x_t = (alpha_t/alpha_s0) x + alpha_t c_0 eps_0 + alpha_t c_1 eps_1 + alpha_t c_2 eps_2
    return StepCoeffs(p_x=p_x, p_m=p_m, c_x=alpha_t / alpha_s0, c_x0=weights[0], **_history(weights[1:]))


# -- sigma-parameterised ODE steps: Heun, linear multistep (LMS) -------------------------------
# The unscaled sample is x = x0 + sigma*eps (Karras et al. 2022); d = (x - x0)/sigma is the
# derivative dx/dsigma of the probability-flow ODE (their eq. 4 with sigma(t) = t).
_GAUSS_LEGENDRE_3 = ((-math.sqrt(0.6), 5 / 9), (0.0, 8 / 9), (math.sqrt(0.6), 5 / 9))  # exact to degree 5


def ode_derivative(sigma: float, *, prediction_type: str = "epsilon") -> StepCoeffs:
    """The ODE derivative d = (x - x0)/sigma as the output, written in x and m (Karras et al. 2022, alg. 1).

    epsilon: d = m; sample: d = (x - m)/sigma; v: d = sigma/(sigma^2 + 1) x + m/sqrt(sigma^2 + 1).
    """
    _check_prediction(prediction_type)
    if not sigma > 0:
        raise ValueError(f"the ODE derivative needs sigma > 0; got {sigma}")
    if prediction_type == "epsilon":
        return StepCoeffs(c_m=1.0)
    if prediction_type == "sample":
        return StepCoeffs(c_x=1.0 / sigma, c_m=-1.0 / sigma)
    return StepCoeffs(c_x=sigma / (sigma**2 + 1), c_m=1.0 / math.sqrt(sigma**2 + 1))


def heun(sigma: float, sigma_next: float, *, prediction_type: str = "epsilon", second_stage: bool = False,
         clip_sample_range: float | None = None) -> StepCoeffs:
    """One stage of Heun's second-order step from sigma to sigma_next (Karras et al. 2022, alg. 1).

    First stage, at x: the Euler step x' = x + (sigma_next - sigma) d, d = (x - x0)/sigma.
    Second stage, at x' with the model's output there: x_next = x + (sigma_next - sigma)(d + d')/2,
    d' = (x' - x0')/sigma_next; history[0] must hold the first stage's x and history[1] its x0.
    Both stages clip x0 to clip_sample_range when given.
    """
    _check_prediction(prediction_type)
    clip = _clip(clip_sample_range)
    if not second_stage:
        return euler(sigma, sigma_next, prediction_type=prediction_type)._replace(clip=clip)
    if not (sigma > 0 and sigma_next > 0):
        raise ValueError(f"Heun's second stage needs sigma, sigma_next > 0; got {sigma}, {sigma_next}")
    p_x, p_m = _ve_x0(sigma_next, prediction_type)
    half = 0.5 * (sigma_next - sigma)  # dt/2
    # x_next = x + dt/2 (x - x0)/sigma + dt/2 (x' - x0')/sigma_next, with x, x0 read from the history
    return StepCoeffs(p_x=p_x, p_m=p_m, c_x=half / sigma_next, c_x0=-half / sigma_next, c_h0=1 + half / sigma,
                      c_h1=-half / sigma, clip=clip)


def lms_weights(sigmas: Sequence[float], sigma_next: float) -> tuple[float, ...]:
    """Linear multistep weights on a non-uniform grid in sigma (k-diffusion's ``sample_lms``).

    c_j = integral from sigmas[0] to sigma_next of the Lagrange basis polynomial of node sigmas[j]
    over the nodes ``sigmas`` (the current level first, then earlier ones); exact (Gauss-Legendre,
    3 points) for up to 6 nodes.
    """
    nodes = [float(s) for s in sigmas]
    if not 1 <= len(nodes) <= MAX_HISTORY + 1:
        raise ValueError(f"lms_weights takes 1 to {MAX_HISTORY + 1} noise levels; got {len(nodes)}")
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"lms_weights needs distinct noise levels; got {nodes}")
    h = sigma_next - nodes[0]

    def basis(j: int, tau: float) -> float:  # l_j(tau) = prod_{k != j} (tau - s_k)/(s_j - s_k)
        return math.prod((tau - s) / (nodes[j] - s) for k, s in enumerate(nodes) if k != j)

    taus = [(nodes[0] + 0.5 * h * (1 + u), w) for u, w in _GAUSS_LEGENDRE_3]
    return tuple(0.5 * h * sum(w * basis(j, tau) for tau, w in taus) for j in range(len(nodes)))


def linear_multistep(sigma: float, weights: Sequence[float], *, prediction_type: str = "epsilon") -> StepCoeffs:
    """Linear multistep step x_next = x + sum_j weights[j] d_j (weights from :func:`lms_weights`).

    d_0 is this call's derivative (x - x0)/sigma, formed from x and m; d_j for j >= 1 are earlier
    derivatives in history[j-1], most recent first.
    """
    if not 1 <= len(weights) <= MAX_HISTORY + 1:
        raise ValueError(f"linear_multistep takes 1 to {MAX_HISTORY + 1} weights; got {len(weights)}")
    d = ode_derivative(sigma, prediction_type=prediction_type)
    p_x, p_m = _ve_x0(sigma, prediction_type)
    w0 = float(weights[0])
    return StepCoeffs(p_x=p_x, p_m=p_m, c_x=1 + w0 * d.c_x, c_m=w0 * d.c_m, **_history(weights[1:]))


RULES: dict[str, Callable[..., StepCoeffs]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "euler_ancestral": euler_ancestral,
    "heun": heun,
    "linear_multistep": linear_multistep,
    "ode_derivative": ode_derivative,
    "dpmpp_2m": dpmpp_2m,
    "pndm": pndm,
    "dpm_solver_multistep": dpm_solver_multistep,
    "deis_multistep": deis_multistep,
}


def step_coeffs(rule: str, *args, **kwargs) -> StepCoeffs:
    """Coefficients of update rule ``rule`` (a key of :data:`RULES`) for one step."""
    try:
        builder = RULES[rule]
    except KeyError:
        raise ValueError(f"unknown update rule {rule!r}; known rules: {', '.join(RULES)}") from None
    return builder(*args, **kwargs)
