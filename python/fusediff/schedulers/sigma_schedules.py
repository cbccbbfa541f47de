"""Noise levels of the sigma-parameterised samplers (Euler, Heun, LMS, DPM-Solver, DEIS, UniPC).

A discrete variance-preserving schedule alpha-bar_t is the variance-exploding process
x = x0 + sigma*eps with sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t) (Karras et al. 2022,
arXiv:2206.00364, table 1). A sampler may step on other noise levels than the trained ones
(Karras' rho schedule, an exponential one); the timestep it passes to the model is then the
fractional t whose log-sigma interpolates the table's.

The trained table is computed in torch and the rest in numpy, in the precision of the input (the
float32 alpha-bar table gives float32 sigmas), as diffusers' schedulers compute them, so a sampler
built on them picks the same sigmas and timesteps as diffusers' of the same name.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SIGMA_SCHEDULES = ("karras", "exponential")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")  # where a run ends: sigma 0, or the smallest trained sigma


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t) for every trained timestep, in the table's dtype.

    Computed in torch: numpy's float32 square root differs from torch's by an ulp at some t, and
    diffusers computes this table in torch.
    """
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional timesteps of ``sigma``: linear interpolation of t in log-sigma over the table.

    ``log_sigmas`` is log(sigma_t) for t = 0 .. T-1 (ascending); values outside it clamp to 0 or T-1.
    """
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]  # (T, n)
    # the last table entry at or below each sigma, kept one short of the end
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """n noise levels from sigma_max down to sigma_min, uniform in sigma^(1/rho) (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n noise levels from sigma_max down to sigma_min, uniform in log sigma."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def resample_sigmas(sigmas: np.ndarray, n: int, schedule: str, sigma_min: float | None = None,
                    sigma_max: float | None = None) -> np.ndarray:
    """n levels of ``schedule`` (karras or exponential) between the ends of the descending ``sigmas``
    (or ``sigma_min``/``sigma_max`` where the config gives them)."""
    lo = float(sigmas[-1]) if sigma_min is None else sigma_min
    hi = float(sigmas[0]) if sigma_max is None else sigma_max
    if schedule == "karras":
        return karras_sigmas(lo, hi, n)
    if schedule == "exponential":
        return exponential_sigmas(lo, hi, n)
    raise ValueError(f"sigma schedule must be one of {', '.join(SIGMA_SCHEDULES)}; got {schedule!r}")
