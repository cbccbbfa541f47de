"""LMS: a linear multistep (Adams-Bashforth) method for the probability-flow ODE in sigma.

The ODE dx/dsigma = d(x, sigma) = (x - x0)/sigma (Karras et al. 2022, eq. 4) is stepped from sigma_i to
sigma_{i+1} with the derivatives of the last k steps (Crowson's ``sample_lms`` in k-diffusion):

    x_{i+1} = x_i + sum_{j<k} c_j d_{i-j},   c_j = integral over [sigma_i, sigma_{i+1}] of the Lagrange
                                             basis polynomial of sigma_{i-j} on sigma_i, ..., sigma_{i-k+1}

with k = min(i + 1, order), order 4 by default (``step(..., order=k)``, at most 5: the fused op reads 4
earlier derivatives). The weights are exact integrals (``scheduler_step_coeffs.lms_weights``). Each step
is one fused op for the update (``linear_multistep``; history = earlier derivatives, newest first) and,
except for epsilon prediction, where d = m is the model output itself, a second one that forms d_i
(``ode_derivative``) for the history.

Same config keys, defaults, tables and call sequence as diffusers' ``LMSDiscreteScheduler`` (DESIGN.md,
decision 4), including its state ``derivatives`` (oldest first) and, in a run entered mid-schedule, its
choice of k from the step index: the k-node weights are then used for the fewer derivatives there are.
diffusers integrates in float32 with scipy's quad; these weights are float64. Differences: beta sigmas
raise NotImplementedError; see also sigma_scheduler.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..configuration import register_to_config
from ..kernels import scheduler_step_coeffs as sc
from .scheduling_euler_discrete import BETA_SCHEDULES
from .beta_schedules import make_betas
from .fused_step import step_inputs
from .registry import compatibles_of
from .scheduling_base import SchedulerOutput
from .sigma_scheduler import SigmaScheduler, Timestep, sigma_schedule_of

LMSDiscreteSchedulerOutput = SchedulerOutput  # the name diffusers gives this scheduler's output
MAX_ORDER = sc.MAX_HISTORY + 1  # the current derivative and the history the fused op reads


class LMSDiscreteScheduler(SigmaScheduler):
    """Linear multistep sampler in sigma (k-diffusion's ``sample_lms``).

    Args:
        num_train_timesteps: number T of diffusion steps the model was trained with.
        beta_start, beta_end: first and last beta of the linear-type schedules.
        beta_schedule: linear, scaled_linear or squaredcos_cap_v2 (cosine).
        trained_betas: explicit betas; overrides the three arguments above.
        use_karras_sigmas: resample the run's levels uniformly in sigma^(1/7) (Karras et al. 2022, eq. 5).
        use_exponential_sigmas: resample them uniformly in log sigma.
        use_beta_sigmas: beta-distributed levels; not implemented (raises NotImplementedError).
        prediction_type: what the model predicts: epsilon, sample (x0) or v_prediction.
        timestep_spacing: linspace, leading or trailing (Lin et al. 2024, table 2).
        steps_offset: added to the leading-spaced timesteps.
    """

    _compatibles = compatibles_of("LMSDiscreteScheduler")
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Sequence[float] | np.ndarray | None = None,
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, prediction_type: str = "epsilon",
                 timestep_spacing: str = "linspace", steps_offset: int = 0):
        schedule = sigma_schedule_of(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
        betas = make_betas(type(self).__name__, beta_schedule, num_train_timesteps, beta_start, beta_end,
                           trained_betas, BETA_SCHEDULES)
        self._init_sigma_tables(betas, prediction_type=prediction_type, timestep_spacing=timestep_spacing,
                                sigma_schedule=schedule)
        self.set_timesteps(num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Lay out a run of ``num_inference_steps`` timesteps spaced by ``timestep_spacing`` (descending)."""
        self._set_timesteps(num_inference_steps, device)

    def _reset_run(self) -> None:
        self.derivatives: list[torch.Tensor] = []  # d of the last steps, oldest first

    def step(self, model_output: torch.Tensor, timestep: Timestep, sample: torch.Tensor, order: int = 4,
             return_dict: bool = True) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """x at the next noise level from x (``sample``), the model's output and the earlier derivatives.

        Args:
            order: number of derivatives combined (1 to 5); fewer at the start of a run.
            return_dict: return a ``SchedulerOutput`` rather than ``(prev_sample, pred_original_sample)``.
        """
        if isinstance(order, bool) or int(order) != order or not 1 <= order <= MAX_ORDER:
            raise ValueError(f"order must be an integer in [1, {MAX_ORDER}]; got {order!r}")
        i = self._begin_step(timestep)
        x, m = step_inputs(sample, model_output)
        sigma, pred = self._sigma(i), self.config.prediction_type

        # 1. d_i = (x - x0)/sigma for the history: the model output itself for epsilon, else a fused op
        d_coeffs = sc.ode_derivative(sigma, prediction_type=pred)
        d = m if d_coeffs == sc.StepCoeffs(c_m=1.0) else self._fused(x, m, d_coeffs, return_pred=False)
        self.derivatives.append(d)
        if len(self.derivatives) > order:  # one out, as diffusers (order may change between calls)
            self.derivatives.pop(0)

        # 2. weights of the k nodes sigma_i, ..., sigma_{i-k+1}; as many as there are derivatives
        k = min(i + 1, order)
        weights = sc.lms_weights([self._sigma(i - j) for j in range(k)], self._sigma(i + 1))
        weights = weights[:len(self.derivatives)]
        history = self.derivatives[-2::-1][:len(weights) - 1]  # earlier derivatives, newest first

        # 3. x_{i+1} = x + c_0 d_i + sum_j c_j d_{i-j} and x0 in one fused op
        coeffs = sc.linear_multistep(sigma, weights, prediction_type=pred)
        prev, x0 = self._fused(x, m, coeffs, history=history)
        return self._finish(prev, x0, return_dict)
