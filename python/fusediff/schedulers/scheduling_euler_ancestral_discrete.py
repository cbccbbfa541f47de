"""Euler ancestral: an Euler step to a lower level, then fresh noise up to the next level (k-diffusion).

From sigma_i to sigma_{i+1} (Crowson's ``sample_euler_ancestral`` in k-diffusion; the ancestral
split of Song et al. 2021 and Karras et al. 2022, eq. 6, with eta = 1):

    sigma_up   = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2)
    sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2)
    x_{i+1}    = x + (sigma_down - sigma_i) (x - x0) / sigma_i + sigma_up z

in one fused op. Noise is drawn at every step (the last one too, where sigma_up = 0), in the model
output's shape and dtype, so a seeded run reproduces diffusers' ``EulerAncestralDiscreteScheduler``;
config keys, defaults, timesteps and sigmas are its own (DESIGN.md, decisions 4 and 5). Differences:
prediction_type "sample" is supported (diffusers raises NotImplementedError); a float64 sample stays
float64; see also sigma_scheduler.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..configuration import register_to_config
from ..kernels import scheduler_step_coeffs as sc
from ..utils.torch_utils import randn_tensor
from .scheduling_euler_discrete import BETA_SCHEDULES
from .beta_schedules import make_betas
from .fused_step import like
from .registry import compatibles_of
from .scheduling_base import SchedulerOutput
from .sigma_scheduler import SigmaScheduler, Timestep

EulerAncestralDiscreteSchedulerOutput = SchedulerOutput  # the name diffusers gives this scheduler's output


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    """Ancestral sampling with Euler steps (k-diffusion's ``sample_euler_ancestral``).

    Args:
        num_train_timesteps: number T of diffusion steps the model was trained with.
        beta_start, beta_end: first and last beta of the linear-type schedules.
        beta_schedule: linear, scaled_linear or squaredcos_cap_v2 (cosine).
        trained_betas: explicit betas; overrides the three arguments above.
        prediction_type: what the model predicts: epsilon, sample (x0) or v_prediction.
        timestep_spacing: linspace, leading or trailing (Lin et al. 2024, table 2).
        steps_offset: added to the leading-spaced timesteps.
        rescale_betas_zero_snr: rescale betas to zero terminal SNR (Lin et al. 2024, alg. 1), with the
            last alpha-bar set to 2^-24 so that sigma stays finite.
    """

    _compatibles = compatibles_of("EulerAncestralDiscreteScheduler")
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Sequence[float] | np.ndarray | None = None,
                 prediction_type: str = "epsilon", timestep_spacing: str = "linspace", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        betas = make_betas(type(self).__name__, beta_schedule, num_train_timesteps, beta_start, beta_end,
                           trained_betas, BETA_SCHEDULES)
        self._init_sigma_tables(betas, prediction_type=prediction_type, timestep_spacing=timestep_spacing,
                                rescale_betas_zero_snr=rescale_betas_zero_snr)
        self._install_train_schedule(torch.float64)  # diffusers' initial timesteps are float64 (then float32)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Lay out a run of ``num_inference_steps`` timesteps spaced by ``timestep_spacing`` (descending)."""
        self._set_timesteps(num_inference_steps, device)

    def step(self, model_output: torch.Tensor, timestep: Timestep, sample: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None,
             return_dict: bool = True) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """x at the next noise level from x (``sample``) and the model's output at ``timestep``.

        Args:
            timestep: one of ``scheduler.timesteps`` (float); the run's first step looks it up.
            generator: draws the ancestral noise (in the model output's shape and dtype), as diffusers.
            return_dict: return a ``SchedulerOutput`` rather than ``(prev_sample, pred_original_sample)``.
        """
        self._refuse_index(timestep)
        i = self._begin_step(timestep)
        # 1. sigma_up and sigma_down of the step, as coefficients of x, x0 and z
        coeffs = sc.euler_ancestral(self._sigma(i), self._sigma(i + 1), prediction_type=self.config.prediction_type)
        x, m = self._upcast(sample, model_output)
        # 2. z, drawn at every step
        noise = like(randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                  dtype=model_output.dtype), x)
        # 3. the Euler step to sigma_down plus sigma_up z in one fused op
        prev, x0 = self._fused(x, m, coeffs, noise=noise)
        return self._finish(prev.to(model_output.dtype), x0, return_dict)
