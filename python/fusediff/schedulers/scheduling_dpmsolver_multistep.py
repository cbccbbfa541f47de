"""Multistep DPM-Solver and DPM-Solver++ (Lu et al. 2022, arXiv:2206.00927 and arXiv:2211.01095).

An exponential integrator of the diffusion ODE in lambda = log(alpha_t/sigma_t): the linear part is
solved exactly and the model's prediction is extrapolated from this and the last one or two steps.
DPM-Solver++(kM) integrates the data prediction x0 (alg. 2 of arXiv:2211.01095); from x_s0 to x_t with
h = lambda_t - lambda_s0 and D0 = x0(s0), D1 and D2 divided differences over the earlier x0:

    x_t = (sigma_t/sigma_s0) x_s0 + alpha_t (1 - e^-h) D0 + a1(h) D1 + a2(h) D2

(2M: a1 = alpha_t (1 - e^-h)/2 for "midpoint", alpha_t (1 - (1 - e^-h)/h) for "heun", no D2). The
SDE variant (sde-dpmsolver++) scales x by e^-h, replaces h by 2h in the D terms and adds
sigma_t sqrt(1 - e^-2h) z. "dpmsolver" and "sde-dpmsolver" integrate the noise prediction instead
(eq. 3.7 of arXiv:2206.00927). Each step is one fused op (:func:`fusediff.kernels.scheduler_step`):
the x0 slot converts the model output, the history slots hold the earlier converted outputs
(:func:`fusediff.kernels.scheduler_step_coeffs.dpm_solver_multistep` gives the coefficients).

Same config keys, defaults, timesteps, sigmas, order schedule and noise draws as diffusers'
``DPMSolverMultistepScheduler`` (DESIGN.md, decisions 4 and 5). Differences: coefficients are computed
in float64 from the float32 sigmas (diffusers: float32), and float64 samples stay float64 (diffusers
rounds the sample to float32); the third-order sde-dpmsolver++ step uses the exact integral
alpha_t (1/2 - (e^-2h - 1 + 2h)/(2h)^2) for D2, where diffusers' has -1/2 (it is off by alpha_t D2);
sde-dpmsolver has no third order (diffusers fails at its third step), use_beta_sigmas,
use_flow_sigmas and flow_prediction raise NotImplementedError; see also multistep_scheduler.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..configuration import register_to_config
from ..kernels import scheduler_step_coeffs as sc
from ..utils.torch_utils import randn_tensor
from .beta_schedules import make_betas
from .multistep_scheduler import BETA_SCHEDULES, MultistepScheduler
from .registry import compatibles_of
from .scheduling_base import SchedulerOutput

ALGORITHM_TYPES = sc.DPM_SOLVER_ALGORITHMS
VARIANCE_TYPES = (None, "learned", "learned_range")


class DPMSolverMultistepScheduler(MultistepScheduler):
    """Multistep DPM-Solver(++) of order 1, 2 or 3 (Lu et al. 2022).

    Args:
        num_train_timesteps: number T of diffusion steps the model was trained with.
        beta_start, beta_end: first and last beta of the linear-type schedules.
        beta_schedule: linear, scaled_linear or squaredcos_cap_v2 (cosine).
        trained_betas: explicit betas; overrides the three arguments above.
        solver_order: 1, 2 or 3 (2 for guided sampling, 3 for unconditional sampling).
        prediction_type: what the model predicts: epsilon, sample (x0) or v_prediction.
        thresholding: dynamic thresholding of x0 (Saharia et al. 2022), with
            ``dynamic_thresholding_ratio`` (the quantile) and ``sample_max_value`` (its cap).
        algorithm_type: dpmsolver++ (data prediction), sde-dpmsolver++, dpmsolver (noise
            prediction) or sde-dpmsolver.
        solver_type: midpoint or heun: the D1 term of second-order steps.
        lower_order_final: lower the order of the last steps of runs shorter than 15 steps.
        euler_at_final: make the last step first order whatever the run's length.
        use_karras_sigmas, use_exponential_sigmas, use_lu_lambdas: resample the noise levels as
            Karras et al. 2022 (eq. 5), uniformly in log sigma, or uniformly in lambda.
        use_beta_sigmas, use_flow_sigmas, flow_shift, use_dynamic_shifting, time_shift_type:
            diffusers' keys, kept for configs; the features raise NotImplementedError.
        final_sigmas_type: the level after the last step: zero (a clean sample) or sigma_min
            (the trained sigma at t = 0); dpmsolver and sde-dpmsolver need sigma_min.
        lambda_min_clipped: runs start no lower than this lambda (cosine schedules need it).
        variance_type: learned or learned_range when the model output also holds a variance
            (its second half of channels, ignored).
        timestep_spacing: linspace, leading or trailing (Lin et al. 2024, table 2).
        steps_offset: added to the leading-spaced timesteps.
        rescale_betas_zero_snr: rescale betas to zero terminal SNR (Lin et al. 2024, alg. 1).
    """

    _compatibles = compatibles_of("DPMSolverMultistepScheduler")

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Sequence[float] | np.ndarray | None = None,
                 solver_order: int = 2, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint", lower_order_final: bool = True,
                 euler_at_final: bool = False, use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, use_lu_lambdas: bool = False, use_flow_sigmas: bool = False,
                 flow_shift: float = 1.0, final_sigmas_type: str = "zero", lambda_min_clipped: float = -float("inf"),
                 variance_type: str | None = None, timestep_spacing: str = "linspace", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential"):
        # configs of the sibling solvers map onto this one's defaults, as in diffusers
        if algorithm_type == "deis":
            self.register_to_config(algorithm_type="dpmsolver++")
        elif algorithm_type not in ALGORITHM_TYPES:
            raise NotImplementedError(f"algorithm_type {algorithm_type!r} is not implemented for "
                                      f"{type(self).__name__}; "
                                      f"choose one of {', '.join(ALGORITHM_TYPES)}")
        if solver_type in ("logrho", "bh1", "bh2"):
            self.register_to_config(solver_type="midpoint")
        elif solver_type not in ("midpoint", "heun"):
            raise NotImplementedError(f"solver_type {solver_type!r} is not implemented for {type(self).__name__}; "
                                      "choose midpoint or heun")
        self._check_config()
        algorithm = self.config.algorithm_type
        if not algorithm.endswith("++") and final_sigmas_type == "zero":
            raise ValueError(f"final_sigmas_type 'zero' needs a data-prediction algorithm; {algorithm} steps "
                             "with the noise prediction, which is undefined at sigma = 0: use 'sigma_min'")
        if algorithm == "sde-dpmsolver" and solver_order == 3:
            raise NotImplementedError("sde-dpmsolver has no third-order update; use solver_order 1 or 2")
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be None, 'learned' or 'learned_range'; got {variance_type!r}")
        betas = make_betas(type(self).__name__, beta_schedule, num_train_timesteps, beta_start, beta_end,
                           trained_betas, BETA_SCHEDULES)
        self._init_multistep(betas, solver_order, rescale_betas_zero_snr)

    # -- policies of set_timesteps ----------------------------------------------------------------
    def _last_timestep(self) -> int:
        """T less the trailing timesteps whose lambda is below lambda_min_clipped."""
        clipped = torch.searchsorted(torch.flip(self.lambda_t, [0]), self.config.lambda_min_clipped)
        return self.config.num_train_timesteps - int(clipped)

    def _round_resampled_timesteps(self, schedule: str) -> bool:
        return schedule in ("karras", "lu") and self.config.beta_schedule != "squaredcos_cap_v2"

    def _final_sigma(self, sigmas: np.ndarray, schedule: str | None) -> float:
        return 0.0 if self.config.final_sigmas_type == "zero" else self._trained_sigma_min()

    # -- the step ------------------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None,
             variance_noise: torch.Tensor | None = None,
             return_dict: bool = True) -> SchedulerOutput | tuple[torch.Tensor]:
        """x at the next noise level from x (``sample``) and the model's output at ``timestep``.

        Args:
            generator: draws the noise of the SDE variants, as diffusers draws it (float32).
            variance_noise: that noise itself instead of a generator.
            return_dict: return a ``SchedulerOutput`` rather than ``(prev_sample,)``.
        """
        i = self._begin_step(timestep)
        c = self.config
        # 1. the order: lower while the history fills up and, as configured, at the end of the run
        order = self._step_order(c.lower_order_final, c.euler_at_final or c.final_sigmas_type == "zero")
        # 2. coefficients from sigma_s0 = sigmas[i] (and sigma_s1, sigma_s2 before it) to sigma_t = sigmas[i + 1]
        levels = [float(self.sigmas[i - j]) for j in range(order)]
        coeffs = sc.dpm_solver_multistep(float(self.sigmas[i + 1]), levels, prediction_type=c.prediction_type,
                                         algorithm_type=c.algorithm_type, solver_type=c.solver_type)
        # 3. the SDE's noise z: given, or drawn in float32 in the sample's shape (drawn on every step)
        noise = None
        if c.algorithm_type.startswith("sde"):
            if variance_noise is not None and generator is not None:
                raise ValueError("step takes a generator or variance_noise, not both")
            if variance_noise is None:
                variance_noise = randn_tensor(sample.shape, generator=generator, device=sample.device,
                                              dtype=torch.float32)
            noise = variance_noise
        # 4. x_t = c_x x + a0 D0 + (D1, D2 terms over the history) [+ noise] in one fused op
        prev, converted = self.multistep_update(sample, model_output, coeffs, self._history(order), noise,
                                                predict_x0=c.algorithm_type.endswith("++"))
        self._remember(converted)
        self._end_step()
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)
