"""Beta schedules and the alpha-bar table that every fusediff scheduler steps over.

A discrete noise schedule is a table of betas over ``num_train_timesteps`` steps and its cumulative
product alpha-bar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, eq. 4). The betas come from a config's
``beta_schedule`` (linear, scaled_linear, squaredcos_cap_v2, laplace, exp, sigmoid) or its
``trained_betas``, optionally rescaled to zero terminal SNR (Lin et al. 2024). The tables are float32,
as diffusers holds them, so that coefficients read from them are the same numbers.

Limits: which schedules a scheduler takes is its own choice (the ``schedules`` argument of
:func:`make_betas`); the continuous alpha-bar functions are evaluated in float64 and rounded once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

# Last alpha-bar of zero-terminal-SNR betas in the sigma-based and multistep schedulers: float16's smallest
# subnormal, so that sigma_T = sqrt((1 - 2^-24) / 2^-24) = 4096 stays finite (diffusers' choice for its
# Euler, DPM-Solver and UniPC schedulers).
ZERO_SNR_ALPHA_BAR = 2.0**-24


def alpha_bar_cosine(t: float) -> float:
    """Cosine alpha-bar(t), t in [0, 1], offset s = 0.008 (Nichol & Dhariwal 2021, eq. 17)."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def alpha_bar_laplace(t: float) -> float:
    """sqrt(sigmoid(lambda(t))) for the Laplace log-SNR lambda(t) = -0.5 sgn(0.5 - t) ln(1 - 2|t - 0.5|)
    (Hang et al. 2024, mu = 0, b = 0.5), in the form diffusers' "laplace" schedule uses."""
    log_snr = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
    snr = math.exp(log_snr)
    return math.sqrt(snr / (1 + snr))


def alpha_bar_exp(t: float) -> float:
    """Exponential alpha-bar(t) = exp(-12 t)."""
    return math.exp(-12.0 * t)


ALPHA_BAR_FNS: dict[str, Callable[[float], float]] = {
    "cosine": alpha_bar_cosine, "laplace": alpha_bar_laplace, "exp": alpha_bar_exp}


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999,
                        alpha_transform_type: str = "cosine") -> torch.Tensor:
    """Betas that step a continuous alpha-bar(t) in ``num_diffusion_timesteps`` equal steps (float32).

    beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta) (Nichol & Dhariwal 2021, sec. 3.2).
    """
    try:
        alpha_bar = ALPHA_BAR_FNS[alpha_transform_type]
    except KeyError:
        raise ValueError(f"alpha_transform_type must be one of {', '.join(ALPHA_BAR_FNS)}; "
                         f"got {alpha_transform_type!r}") from None
    n = num_diffusion_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last alpha-bar is exactly 0, i.e. zero terminal SNR (Lin et al. 2024, alg. 1)."""
    # 1. sqrt(alpha-bar_t) of the given schedule
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    # 2. shift so that the last value is 0, scale so that the first one is unchanged
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    # 3. back to betas: alpha_t = alpha-bar_t / alpha-bar_{t-1}
    abar = sqrt_abar**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def make_betas(owner: str, beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float,
               trained_betas: Sequence[float] | np.ndarray | None, schedules: Sequence[str]) -> torch.Tensor:
    """The float32 betas of a config; ``schedules`` names the beta_schedule values ``owner`` takes."""
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    if beta_schedule not in schedules:
        raise NotImplementedError(f"beta_schedule {beta_schedule!r} is not implemented for {owner}; "
                                  f"choose one of {', '.join(schedules)}, or pass trained_betas")
    n = num_train_timesteps
    if beta_schedule == "linear":  # Ho et al. 2020, sec. 4
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # linear in sqrt(beta): latent diffusion (Rombach et al. 2022)
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(n)
    if beta_schedule in ("laplace", "exp"):
        return betas_for_alpha_bar(n, alpha_transform_type=beta_schedule)
    if beta_schedule == "sigmoid":  # GeoDiff (Xu et al. 2022)
        return torch.sigmoid(torch.linspace(-6, 6, n)) * (beta_end - beta_start) + beta_start
    raise NotImplementedError(f"beta_schedule {beta_schedule!r} has no definition")


def alpha_bar_tables(betas: torch.Tensor, rescale_betas_zero_snr: bool = False,
                     terminal_alpha_bar: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(betas, alphas, alphas_cumprod) in float32, alpha-bar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, eq. 4).

    With ``rescale_betas_zero_snr`` the betas are rescaled to zero terminal SNR, and the last alpha-bar
    is then set to ``terminal_alpha_bar`` when given (the sigma-based schedulers need it above 0).
    """
    if betas.dim() != 1 or betas.numel() == 0:
        raise ValueError(f"betas must be a non-empty 1-D sequence; got shape {tuple(betas.shape)}")
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    if rescale_betas_zero_snr and terminal_alpha_bar is not None:
        alphas_cumprod[-1] = terminal_alpha_bar
    return betas, alphas, alphas_cumprod
