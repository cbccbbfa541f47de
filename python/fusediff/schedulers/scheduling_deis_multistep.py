"""DEIS: diffusion exponential integrator sampler, multistep log-rho variant (Zhang & Chen 2023,
arXiv:2204.13902).

With rho = sigma_t/alpha_t (the variance-exploding noise level) the probability-flow ODE of a VP
model reads d(x/alpha) = eps_theta drho (eq. 11 rescaled). DEIS integrates it exactly against a
polynomial extrapolation of the noise prediction through this and the last one or two steps,
the polynomial being in log rho ("logrho", the tAB-DEIS of sec. 4 in the log-time of eq. 15):

    x_t = alpha_t (x_s0 / alpha_s0 + sum_j c_j eps_j),   c_j = int_{rho_s0}^{rho_t} l_j(log rho) drho

with l_j the Lagrange basis polynomials on the log rho of the steps (order 1 is DDIM). Each step is
one fused op (:func:`fusediff.kernels.scheduler_step`): the x0 slot turns the model output into eps,
the history slots hold the earlier eps, and
:func:`fusediff.kernels.scheduler_step_coeffs.deis_multistep` gives the coefficients.

Same config keys, defaults, timesteps, sigmas and order schedule as diffusers' ``DEISMultistepScheduler``
(DESIGN.md, decision 4); coefficients are computed in float64 from the float32 sigmas (diffusers:
float32). use_beta_sigmas, use_flow_sigmas and flow_prediction raise NotImplementedError; see also
multistep_scheduler for the common differences.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..configuration import register_to_config
from ..kernels import scheduler_step_coeffs as sc
from .beta_schedules import make_betas
from .multistep_scheduler import BETA_SCHEDULES, MultistepScheduler
from .registry import compatibles_of
from .scheduling_base import SchedulerOutput


class DEISMultistepScheduler(MultistepScheduler):
    """Multistep DEIS of order 1, 2 or 3 (Zhang & Chen 2023).

    Args:
        num_train_timesteps: number T of diffusion steps the model was trained with.
        beta_start, beta_end: first and last beta of the linear-type schedules.
        beta_schedule: linear, scaled_linear or squaredcos_cap_v2 (cosine).
        trained_betas: explicit betas; overrides the three arguments above.
        solver_order: 1, 2 or 3 (2 for guided sampling, 3 for unconditional sampling).
        prediction_type: what the model predicts: epsilon, sample (x0) or v_prediction.
        thresholding: dynamic thresholding of x0 (Saharia et al. 2022) before eps is re-derived
            from it, with ``dynamic_thresholding_ratio`` (the quantile) and ``sample_max_value``.
        algorithm_type: deis (the only one).
        solver_type: logrho (the only one).
        lower_order_final: lower the order of the last steps of runs shorter than 15 steps.
        use_karras_sigmas, use_exponential_sigmas: resample the noise levels as Karras et al.
            2022 (eq. 5) or uniformly in log sigma; the level after the last step then repeats
            the last one (otherwise it is the trained sigma at t = 0).
        use_beta_sigmas, use_flow_sigmas, flow_shift, use_dynamic_shifting, time_shift_type:
            diffusers' keys, kept for configs; the features raise NotImplementedError.
        timestep_spacing: linspace, leading or trailing (Lin et al. 2024, table 2).
        steps_offset: added to the leading-spaced timesteps.
    """

    _compatibles = compatibles_of("DEISMultistepScheduler")

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Sequence[float] | np.ndarray | None = None,
                 solver_order: int = 2, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 algorithm_type: str = "deis", solver_type: str = "logrho", lower_order_final: bool = True,
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 use_flow_sigmas: bool = False, flow_shift: float = 1.0, timestep_spacing: str = "linspace",
                 steps_offset: int = 0, use_dynamic_shifting: bool = False, time_shift_type: str = "exponential"):
        # configs of the sibling solvers map onto this one's defaults, as in diffusers
        if algorithm_type in ("dpmsolver", "dpmsolver++"):
            self.register_to_config(algorithm_type="deis")
        elif algorithm_type != "deis":
            raise NotImplementedError(f"algorithm_type {algorithm_type!r} is not implemented for "
                                      f"{type(self).__name__}; "
                                      "it implements deis")
        if solver_type in ("midpoint", "heun", "bh1", "bh2"):
            self.register_to_config(solver_type="logrho")
        elif solver_type != "logrho":
            raise NotImplementedError(f"solver_type {solver_type!r} is not implemented for {type(self).__name__}; "
                                      "it implements logrho")
        self._check_config()
        betas = make_betas(type(self).__name__, beta_schedule, num_train_timesteps, beta_start, beta_end,
                           trained_betas, BETA_SCHEDULES)
        self._init_multistep(betas, solver_order)

    # -- policies of set_timesteps ----------------------------------------------------------------
    def _final_sigma(self, sigmas: np.ndarray, schedule: str | None) -> float:
        """The last resampled level again, or the trained sigma at t = 0."""
        return float(sigmas[-1]) if schedule is not None else self._trained_sigma_min()

    # -- the step ------------------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             return_dict: bool = True) -> SchedulerOutput | tuple[torch.Tensor]:
        """x at the next noise level from x (``sample``) and the model's output at ``timestep``.

        Returns ``SchedulerOutput(prev_sample)``, or ``(prev_sample,)``.
        """
        i = self._begin_step(timestep)
        # 1. the order: lower while the history fills up and at the end of short runs
        order = self._step_order(self.config.lower_order_final)
        # 2. coefficients from rho_s0 = sigmas[i] (and rho_s1, rho_s2 before it) to rho_t = sigmas[i + 1]
        levels = [float(self.sigmas[i - j]) for j in range(order)]
        coeffs = sc.deis_multistep(float(self.sigmas[i + 1]), levels, prediction_type=self.config.prediction_type)
        # 3. x_t = (alpha_t/alpha_s0) x + alpha_t sum_j c_j eps_j in one fused op (eps_0 from the model output)
        prev, eps = self.multistep_update(sample, model_output, coeffs, self._history(order), predict_x0=False)
        self._remember(eps)
        self._end_step()
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)
