"""UniPC: a unified predictor-corrector framework for fast sampling (Zhao et al. 2023, arXiv:2302.04867).

A multistep exponential integrator of the diffusion ODE in lambda = log(alpha_t/sigma_t). Each step
takes the model's output m at x_i (the sample at timestep t_i) and converts it to D_i, the data
prediction x0 (``predict_x0``, UniPC's default) or the noise eps; then

    1. UniC (corrector) of order p: x_i^c = the last step's update from x_{i-1}^c to t_i redone with
       D_i as one more point (r_p = 1): this raises the accuracy order of that step by one at no
       extra model call. It is skipped on the first step and at indices in ``disable_corrector``.
    2. UniP (predictor) of order p': x_{i+1} = from x_i^c (or x_i) to t_{i+1} over D_i and the last
       p' - 1 predictions, the extrapolation weighted by B(h) = h ("bh1") or e^h - 1 ("bh2").

(:mod:`fusediff.kernels.scheduler_step_unipc` has the formulas.) Both are linear in the samples and
predictions, and UniC differs from the last UniP only in the D terms, so x_i^c = x_i' + (UniC - UniP)(D)
with x_i' the last step's output, and the whole step is one fused op
(:func:`fusediff.kernels.scheduler_step`): its x0 slot converts m to D_i, its four history slots hold
x_i' and the three most recent earlier D. Dynamic thresholding of x0 adds a call before it.

Same config keys, defaults, timesteps, sigmas and order schedule as diffusers'
``UniPCMultistepScheduler`` (DESIGN.md, decision 4); as in diffusers, the corrector reads the last
step's own result, not the ``sample`` passed in (which only converts the model output). Differences:
- coefficients are computed in float64 from the float32 sigmas (diffusers: float32);
- the last output is held by reference: changing ``prev_sample`` in place before a corrected step
  raises RuntimeError (diffusers keeps its own copy; under ``torch.inference_mode`` it goes undetected);
- where diffusers returns NaN, ours is the limit: the step to sigma = 0 with bh1 or with noise
  prediction (x0), and a zero-length last step (Karras levels with final_sigmas_type='sigma_min');
- ``lower_order_final=False`` with ``final_sigmas_type='zero'`` and an order > 1 raises ValueError
  (diffusers' last step divides by r_k = 0: inf);
- ``solver_p``, flow and beta sigmas and flow_prediction raise NotImplementedError; see also
  multistep_scheduler (e.g. a timestep outside the schedule raises).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..configuration import register_to_config
from ..kernels.scheduler_step_coeffs import prediction_coeffs
from ..kernels.scheduler_step_unipc import SOLVER_TYPES, Update, half_log_snr, unipc_coeffs, unipc_update
from .beta_schedules import make_betas
from .multistep_scheduler import BETA_SCHEDULES, MultistepScheduler
from .registry import compatibles_of
from .scheduling_base import SchedulerOutput

SIBLING_SOLVER_TYPES = ("midpoint", "heun", "logrho")  # DPM-Solver's and DEIS's; read as bh2, as diffusers


class UniPCMultistepScheduler(MultistepScheduler):
    """Multistep UniPC of order 1, 2 or 3 (Zhao et al. 2023): UniP predictor, UniC corrector.

    Args:
        num_train_timesteps: number T of diffusion steps the model was trained with.
        beta_start, beta_end: first and last beta of the linear-type schedules.
        beta_schedule: linear, scaled_linear or squaredcos_cap_v2 (cosine).
        trained_betas: explicit betas; overrides the three arguments above.
        solver_order: 1, 2 or 3 (2 for guided sampling, 3 for unconditional sampling).
        prediction_type: what the model predicts: epsilon, sample (x0) or v_prediction.
        thresholding: dynamic thresholding of x0 (Saharia et al. 2022; data prediction only), with
            ``dynamic_thresholding_ratio`` (the quantile) and ``sample_max_value`` (its cap).
        predict_x0: integrate the data prediction x0 (UniPC's default) rather than the noise eps.
        solver_type: bh1 (B(h) = h, for unconditional sampling with few steps) or bh2 (B(h) = e^h - 1).
        lower_order_final: lower the order of the last steps (order <= steps left), whatever the run's length.
        disable_corrector: step indices whose result is not corrected (at the next step); the corrector
            can hurt with large guidance scales.
        solver_p: another scheduler as predictor in diffusers; not implemented (must be None).
        use_karras_sigmas, use_exponential_sigmas: resample the noise levels as Karras et al. 2022
            (eq. 5) or uniformly in log sigma, between ``sigma_min`` and ``sigma_max`` when given.
        use_beta_sigmas, use_flow_sigmas, flow_shift, use_dynamic_shifting, time_shift_type,
            shift_terminal: diffusers' keys, kept for configs; the features raise NotImplementedError.
        timestep_spacing: linspace, leading or trailing (Lin et al. 2024, table 2).
        steps_offset: added to the leading-spaced timesteps.
        final_sigmas_type: the level after the last step: zero (a clean sample) or sigma_min (the last
            resampled level, or the trained sigma at t = 0).
        rescale_betas_zero_snr: rescale betas to zero terminal SNR (Lin et al. 2024, alg. 1).
    """

    _compatibles = compatibles_of("UniPCMultistepScheduler")

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Sequence[float] | np.ndarray | None = None,
                 solver_order: int = 2, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0, predict_x0: bool = True,
                 solver_type: str = "bh2", lower_order_final: bool = True, disable_corrector: Sequence[int] = (),
                 solver_p: MultistepScheduler | None = None, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False, use_flow_sigmas: bool = False,
                 flow_shift: float = 1.0, timestep_spacing: str = "linspace", steps_offset: int = 0,
                 final_sigmas_type: str = "zero", rescale_betas_zero_snr: bool = False,
                 use_dynamic_shifting: bool = False, time_shift_type: str = "exponential",
                 sigma_min: float | None = None, sigma_max: float | None = None, shift_terminal: float | None = None):
        # configs of the sibling solvers map onto this one's default, as in diffusers
        if solver_type in SIBLING_SOLVER_TYPES:
            self.register_to_config(solver_type="bh2")
        elif solver_type not in SOLVER_TYPES:
            raise NotImplementedError(f"solver_type {solver_type!r} is not implemented for {type(self).__name__}; "
                                      f"choose one of {', '.join(SOLVER_TYPES)}")
        if solver_p is not None:
            raise NotImplementedError("solver_p (another scheduler as UniPC's predictor) is not implemented in "
                                      "fusediff; pass solver_p=None")
        if shift_terminal is not None and not use_flow_sigmas:
            raise ValueError("shift_terminal is only supported with use_flow_sigmas=True")
        if not isinstance(predict_x0, bool):
            raise TypeError(f"predict_x0 must be True or False; got {predict_x0!r}")
        if isinstance(disable_corrector, (str, bytes)) or not all(
                isinstance(j, int) and not isinstance(j, bool) for j in disable_corrector):
            raise TypeError(f"disable_corrector must be a list of step indices; got {disable_corrector!r}")
        self._check_config()
        if not lower_order_final and solver_order > 1 and final_sigmas_type == "zero":
            raise ValueError("lower_order_final=False with final_sigmas_type='zero' makes the last step of order > 1 "
                             "divide by r_k = 0 at sigma = 0 (diffusers returns inf): set lower_order_final=True "
                             "or final_sigmas_type='sigma_min'")
        betas = make_betas(type(self).__name__, beta_schedule, num_train_timesteps, beta_start, beta_end,
                           trained_betas, BETA_SCHEDULES)
        self._init_multistep(betas, solver_order, rescale_betas_zero_snr)
        self.predict_x0 = predict_x0
        self.disable_corrector = list(disable_corrector)  # read at every step, as diffusers' attribute
        self.solver_p = None
        self._reset_run()

    def _reset_run(self) -> None:
        """Forget the last step: its output x_i' (the corrector's start), its UniP update and order."""
        self._last_output: torch.Tensor | None = None
        self._last_version: int | None = None
        self._last_update: Update | None = None
        self.this_order = 0

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: Sequence[int] | None = None) -> None:
        """Choose the run's timesteps and noise levels (see :class:`MultistepScheduler`), and reset the run."""
        super().set_timesteps(num_inference_steps, device=device, timesteps=timesteps)
        self._reset_run()

    # -- the step ------------------------------------------------------------------------------------
    def _lambda(self, index: int) -> float:
        """lambda = log(alpha/sigma) of ``sigmas[index]`` (float64; +inf at sigma = 0)."""
        return half_log_snr(*self.alpha_sigma(index))

    def _update(self, target: int, start: int, order: int, corrector: bool) -> Update:
        """UniP (or UniC) from ``sigmas[start]`` to ``sigmas[target]`` over the predictions at start,
        start - 1, ..., start - order + 1."""
        c = self.config
        return unipc_update(self._lambda(target), [self._lambda(start - j) for j in range(order)],
                            *self.alpha_sigma(target), *self.alpha_sigma(start), solver_type=c.solver_type,
                            predict_x0=self.predict_x0, corrector=corrector)

    def _order(self, i: int) -> int:
        """UniP's order at step i: solver_order, lower while the history fills up and, with
        lower_order_final, at most the number of steps left."""
        order = self.config.solver_order
        if self.config.lower_order_final:
            order = min(order, len(self.timesteps) - i)
        return min(order, self.lower_order_nums + 1)

    def _corrector_start(self) -> torch.Tensor:
        """The last step's output x_i', refused if it was changed in place since it was returned (not
        detectable for inference tensors, which keep no version counter)."""
        out = self._last_output
        if self._last_version is not None and out._version != self._last_version:
            raise RuntimeError("the prev_sample returned by the last step was modified in place; UniPC's corrector "
                               "restarts from it. Change a copy (or out of place), or call set_timesteps anew")
        return out

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             return_dict: bool = True) -> SchedulerOutput | tuple[torch.Tensor]:
        """x at the next noise level from the model's output at ``timestep`` for ``sample``.

        Returns ``SchedulerOutput(prev_sample)``, or ``(prev_sample,)``.
        """
        i = self._begin_step(timestep)
        c = self.config
        # 1. UniC from x_{i-1}^c to t_i with D_i as the p-th point (p = the last UniP's order), unless
        #    disabled for the last step's result; diffusers' condition, on step indices
        corrector = None
        if self._last_output is not None and i > 0 and (i - 1) not in self.disable_corrector:
            corrector = self._update(i, i - 1, self.this_order, corrector=True)
        # 2. UniP from t_i to t_{i+1} over D_i and the last order - 1 predictions
        order = self._order(i)
        predictor = self._update(i + 1, i, order, corrector=False)
        # 3. D_i = p_x x + p_m m; the step x_{i+1} = UniP(x_i^c, D) with x_i^c = x_i' + (UniC - last UniP)(D)
        alpha, sigma = self.alpha_sigma(i)
        p_x, p_m = prediction_coeffs(alpha, sigma, c.prediction_type, self.predict_x0)
        coeffs, n_old = unipc_coeffs(p_x, p_m, predictor, corrector, self._last_update)
        history = ([self._corrector_start()] if corrector is not None else []) + self._history(n_old + 1)
        # 4. one fused op; with thresholding, D_i (thresholded x0) first, then read as the model output
        if c.thresholding and self.predict_x0:
            converted = self.convert_model_output(model_output, sample)
            # already thresholded: the update takes it as m with D = m (predict_x0=False: no second threshold)
            prev, _ = self.multistep_update(sample, converted, coeffs._replace(p_x=0.0, p_m=1.0), history,
                                            predict_x0=False, threshold_eps=False)
        else:
            prev, converted = self.multistep_update(sample, model_output, coeffs, history,
                                                    predict_x0=self.predict_x0, threshold_eps=False)
        self._remember(converted)
        self._last_output, self._last_version = prev, None if prev.is_inference() else prev._version
        self._last_update, self.this_order = predictor, order
        self._end_step()
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)
