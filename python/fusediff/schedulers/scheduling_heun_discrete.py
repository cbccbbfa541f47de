"""Heun: the second-order (trapezoidal) step of the probability-flow ODE (Karras et al. 2022, alg. 1).

A step from sigma_i to sigma_{i+1} takes two model calls:

    1. at x, sigma_i:             d  = (x - x0) / sigma_i,          x' = x + (sigma_{i+1} - sigma_i) d
    2. at x', sigma_{i+1} (> 0):  d' = (x' - x0') / sigma_{i+1},    x_{i+1} = x + (sigma_{i+1} - sigma_i)(d + d')/2

and the last step, to sigma_n = 0, is the Euler step 1 alone. So the run's tables are doubled as in
diffusers: timesteps [t_0, t_1, t_1, ..., t_{n-1}, t_{n-1}] (2n - 1 model calls) and sigmas
[s_0, s_1, s_1, ..., s_{n-1}, s_{n-1}, 0]; ``state_in_first_order`` says which stage the next call is.
Each call is one fused op (:func:`~fusediff.kernels.scheduler_step_coeffs.heun`): the first stage's x
and x0 are kept and read back by the second as history, so no derivative is stored.

Same config keys, defaults, tables and call sequence as diffusers' ``HeunDiscreteScheduler``
(DESIGN.md, decision 4); x0 is clipped in both stages when ``clip_sample`` is set. Differences:
beta sigmas raise NotImplementedError; see also sigma_scheduler.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..configuration import register_to_config
from ..kernels import scheduler_step_coeffs as sc
from .beta_schedules import make_betas
from .fused_step import step_inputs
from .registry import compatibles_of
from .scheduling_base import SchedulerOutput
from .sigma_scheduler import SigmaScheduler, Timestep, sigma_schedule_of

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "exp")

HeunDiscreteSchedulerOutput = SchedulerOutput  # the name diffusers gives this scheduler's output


class HeunDiscreteScheduler(SigmaScheduler):
    """Heun's second-order sampler of the probability-flow ODE (Karras et al. 2022, alg. 1).

    Args:
        num_train_timesteps: number T of diffusion steps the model was trained with.
        beta_start, beta_end: first and last beta of the linear-type schedules.
        beta_schedule: linear, scaled_linear, squaredcos_cap_v2 (cosine) or exp (alpha-bar = e^{-12 t}).
        trained_betas: explicit betas; overrides the three arguments above.
        prediction_type: what the model predicts: epsilon, sample (x0) or v_prediction.
        use_karras_sigmas: resample the run's levels uniformly in sigma^(1/7) (Karras et al. 2022, eq. 5).
        use_exponential_sigmas: resample them uniformly in log sigma.
        use_beta_sigmas: beta-distributed levels; not implemented (raises NotImplementedError).
        clip_sample: clamp x0 to [-clip_sample_range, clip_sample_range] in both stages.
        clip_sample_range: the clip bound.
        timestep_spacing: linspace, leading or trailing (Lin et al. 2024, table 2).
        steps_offset: added to the leading-spaced timesteps.
    """

    _compatibles = compatibles_of("HeunDiscreteScheduler")
    order = 2

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "linear", trained_betas: Sequence[float] | np.ndarray | None = None,
                 prediction_type: str = "epsilon", use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False, clip_sample: bool = False,
                 clip_sample_range: float = 1.0, timestep_spacing: str = "linspace", steps_offset: int = 0):
        schedule = sigma_schedule_of(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
        betas = make_betas(type(self).__name__, beta_schedule, num_train_timesteps, beta_start, beta_end,
                           trained_betas, BETA_SCHEDULES)
        self._init_sigma_tables(betas, prediction_type=prediction_type, timestep_spacing=timestep_spacing,
                                sigma_schedule=schedule)
        self.set_timesteps(num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      num_train_timesteps: int | None = None, timesteps: Sequence[float] | None = None) -> None:
        """Lay out a run of ``num_inference_steps`` steps (2n - 1 model calls), or of the given ``timesteps``.

        ``num_train_timesteps`` replaces the config's T in the spacing of the timesteps (not in the table).
        """
        self._set_timesteps(num_inference_steps, device, timesteps=timesteps, num_train_timesteps=num_train_timesteps)

    def _install(self, timesteps: np.ndarray, sigmas: np.ndarray, device: str | torch.device | None) -> None:
        """Double every level but the first and the last: each is the end of one stage and the start of the next."""
        t, s = np.asarray(timesteps), np.asarray(sigmas)
        super()._install(np.concatenate([t[:1], t[1:].repeat(2)]), np.concatenate([s[:1], s[1:-1].repeat(2), s[-1:]]),
                         device)

    def _reset_run(self) -> None:
        self.dt: float | None = None  # sigma_{i+1} - sigma_i while a step's second stage is due
        self.sample: torch.Tensor | None = None  # x at the first stage
        self.first_stage_x0: torch.Tensor | None = None  # x0 (clipped) at the first stage

    @property
    def state_in_first_order(self) -> bool:
        """Whether the next call is a step's first stage (else its second)."""
        return self.dt is None

    def step(self, model_output: torch.Tensor, timestep: Timestep, sample: torch.Tensor,
             return_dict: bool = True) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One stage of a Heun step: the Euler predictor, or the trapezoidal corrector.

        Returns the next model input x' after a first stage, x_{i+1} after a second stage, and the x0
        of this call; as ``SchedulerOutput`` or ``(prev_sample, pred_original_sample)``.
        """
        i = self._begin_step(timestep)
        x, m = step_inputs(sample, model_output)
        clip = self.config.clip_sample_range if self.config.clip_sample else None
        pred = self.config.prediction_type
        if self.state_in_first_order:
            # 1. x' = x + (sigma_{i+1} - sigma_i) d; keep x and x0 for the second stage
            sigma, sigma_next = self._sigma(i), self._sigma(i + 1)
            coeffs = sc.heun(sigma, sigma_next, prediction_type=pred, clip_sample_range=clip)
            prev, x0 = self._fused(x, m, coeffs)
            self.dt, self.sample, self.first_stage_x0 = sigma_next - sigma, x, x0
        else:
            # 2. x_{i+1} = x + dt (d + d')/2 from the kept x, x0 (history) and this call's x', m
            sigma, sigma_next = self._sigma(i - 1), self._sigma(i)
            coeffs = sc.heun(sigma, sigma_next, prediction_type=pred, second_stage=True, clip_sample_range=clip)
            prev, x0 = self._fused(x, m, coeffs, history=(self.sample, self.first_stage_x0))
            self._reset_run()
        return self._finish(prev, x0, return_dict)
