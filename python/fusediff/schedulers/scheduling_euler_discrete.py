"""Euler: the first-order step of the probability-flow ODE in sigma (Karras et al. 2022, alg. 2).

From noise level sigma_i to sigma_{i+1}, with optional "churn" (stochastic sampling, alg. 2
lines 4-6) on the levels in [s_tmin, s_tmax]:

    gamma     = min(s_churn / n, sqrt(2) - 1)   (0 outside [s_tmin, s_tmax])
    sigma_hat = sigma_i (1 + gamma)
    x_hat     = x + sqrt(sigma_hat^2 - sigma_i^2) * s_noise * z            (z only drawn when gamma > 0)
    d         = (x_hat - x0(x_hat)) / sigma_hat                            (the ODE derivative)
    x_{i+1}   = x_hat + (sigma_{i+1} - sigma_hat) d

in one fused op (:func:`fusediff.kernels.scheduler_step` with :func:`~fusediff.kernels.scheduler_step_coeffs.euler`).
The sample is the unscaled x = x0 + sigma*eps; the model sees x / sqrt(sigma^2 + 1).

Same config keys, defaults, timesteps, sigmas and random draws as diffusers' ``EulerDiscreteScheduler``
(DESIGN.md, decisions 4 and 5); like it, the arithmetic runs in the model output's dtype, at least
float32, and ``prev_sample`` is returned in the model output's dtype. Differences: a float64 sample is
kept in float64 (diffusers rounds it to float32 first); integer timesteps raise (as diffusers), and so do
timesteps outside the schedule and steps past its end (see sigma_scheduler); beta sigmas raise
NotImplementedError.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..configuration import register_to_config
from ..kernels import scheduler_step_coeffs as sc
from ..utils.torch_utils import randn_tensor
from .beta_schedules import make_betas
from .fused_step import like
from .registry import compatibles_of
from .scheduling_base import SchedulerOutput
from .sigma_scheduler import SigmaScheduler, Timestep, sigma_schedule_of

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

EulerDiscreteSchedulerOutput = SchedulerOutput  # the name diffusers gives this scheduler's output


def _as_float32(value: float) -> float:
    """``value`` rounded to float32, as diffusers compares it with a float32 sigma."""
    return float(np.float32(value))


class EulerDiscreteScheduler(SigmaScheduler):
    """Euler sampler of the probability-flow ODE with optional churn (Karras et al. 2022, alg. 2).

    Args:
        num_train_timesteps: number T of diffusion steps the model was trained with.
        beta_start, beta_end: first and last beta of the linear-type schedules.
        beta_schedule: linear, scaled_linear or squaredcos_cap_v2 (cosine).
        trained_betas: explicit betas; overrides the three arguments above.
        prediction_type: what the model predicts: epsilon, sample (x0) or v_prediction.
        interpolation_type: sigmas of the run's timesteps: linear (in t over the table) or log_linear
            (n + 1 levels uniform in log sigma from the largest trained sigma to the smallest).
        use_karras_sigmas: resample the run's levels uniformly in sigma^(1/7) (Karras et al. 2022, eq. 5).
        use_exponential_sigmas: resample them uniformly in log sigma.
        use_beta_sigmas: beta-distributed levels; not implemented (raises NotImplementedError).
        sigma_min, sigma_max: ends of the resampled levels (default: the run's own).
        timestep_spacing: linspace, leading or trailing (Lin et al. 2024, table 2).
        timestep_type: discrete, or continuous (with v_prediction the timesteps are 0.25 log sigma).
        steps_offset: added to the leading-spaced timesteps.
        rescale_betas_zero_snr: rescale betas to zero terminal SNR (Lin et al. 2024, alg. 1), with the
            last alpha-bar set to 2^-24 so that sigma stays finite.
        final_sigmas_type: where the run ends: zero, or sigma_min (the smallest trained sigma).
    """

    _compatibles = compatibles_of("EulerDiscreteScheduler")
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Sequence[float] | np.ndarray | None = None,
                 prediction_type: str = "epsilon", interpolation_type: str = "linear",
                 use_karras_sigmas: bool | None = False, use_exponential_sigmas: bool | None = False,
                 use_beta_sigmas: bool | None = False, sigma_min: float | None = None,
                 sigma_max: float | None = None, timestep_spacing: str = "linspace",
                 timestep_type: str = "discrete", steps_offset: int = 0, rescale_betas_zero_snr: bool = False,
                 final_sigmas_type: str = "zero"):
        schedule = sigma_schedule_of(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
        betas = make_betas(type(self).__name__, beta_schedule, num_train_timesteps, beta_start, beta_end,
                           trained_betas, BETA_SCHEDULES)
        self._init_sigma_tables(betas, prediction_type=prediction_type, timestep_spacing=timestep_spacing,
                                rescale_betas_zero_snr=rescale_betas_zero_snr, sigma_schedule=schedule,
                                interpolation_type=interpolation_type, sigma_min=sigma_min, sigma_max=sigma_max,
                                final_sigmas_type=final_sigmas_type, timestep_type=timestep_type)
        self._install_train_schedule()

    def step(self, model_output: torch.Tensor, timestep: Timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: torch.Generator | list[torch.Generator] | None = None,
             return_dict: bool = True) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """x at the next noise level from x (``sample``) and the model's output at ``timestep``.

        Args:
            timestep: one of ``scheduler.timesteps`` (float); the run's first step looks it up.
            s_churn: total churn of the run (Karras' S_churn); 0 is the deterministic ODE step.
            s_tmin, s_tmax: churn only at levels in [s_tmin, s_tmax].
            s_noise: scale of the churn noise (Karras' S_noise).
            generator: draws the churn noise (in the model output's shape and dtype), as diffusers.
            return_dict: return a ``SchedulerOutput`` rather than ``(prev_sample, pred_original_sample)``.
        """
        self._refuse_index(timestep)
        i = self._begin_step(timestep)
        sigma, sigma_next = self._sigma(i), self._sigma(i + 1)

        # 1. gamma of the churn; diffusers compares the bounds with the float32 sigma
        churning = _as_float32(s_tmin) <= sigma <= _as_float32(s_tmax)
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if churning else 0.0
        coeffs = sc.euler(sigma, sigma_next, prediction_type=self.config.prediction_type, gamma=gamma,
                          s_noise=s_noise)
        x, m = self._upcast(sample, model_output)

        # 2. the churn noise z, drawn only when gamma > 0
        noise = None
        if gamma > 0:
            noise = like(randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                      dtype=model_output.dtype), x)

        # 3. x_hat, x0, d and the Euler step in one fused op
        prev, x0 = self._fused(x, m, coeffs, noise=noise)
        return self._finish(prev.to(model_output.dtype), x0, return_dict)
