"""PNDM: pseudo numerical methods for diffusion models (Liu et al. 2022).

Every update is the transfer phi(x_t, eps, t, t') of eq. 11, which moves x_t to x_{t'} along the
DDIM path for a given noise estimate eps:

    x_{t'} = sqrt(abar_t' / abar_t) x_t
             - (abar_t' - abar_t) / (abar_t sqrt(1 - abar_t') + sqrt(abar_t (1 - abar_t) abar_t')) eps

and the methods differ in the eps they feed it (alg. 2, F-PNDM):

1. PRK warm-up: Runge-Kutta (RK4) steps over the first three gaps of the schedule. Each calls the
   model at the start, twice at the midpoint and at the end, every call transferring from the
   start, the last with eps = (e1 + 2 e2 + 2 e3 + e4) / 6 (eq. 13). The start's output joins the
   history.
2. PLMS: the Adams-Bashforth combination of the current and up to three earlier model outputs
   (eq. 12), one model call per step.

With ``skip_prk_steps`` (the PLMS sampler of latent diffusion) there is no warm-up: the first step
is taken twice, an Euler step with the first output, then again from the same start with the mean
of that output and the one at the Euler step's end (a Heun-like second-order step). A v-prediction
is turned into eps after the weighting, with the sample being moved, as diffusers does. Each call
is one fused op (:func:`fusediff.kernels.scheduler_step`): the weighted outputs are its model
output and history.

Same config keys, defaults, timesteps and call sequence as diffusers' ``PNDMScheduler`` (DESIGN.md,
decision 4), and the same running state (``counter``, ``ets``, ``cur_sample``), except that
diffusers keeps the running weighted sum of an RK4 step's outputs where this keeps the outputs
(``prk_model_outputs``) for the fused op to weigh. Differences: ``num_inference_steps`` larger
than ``num_train_timesteps`` raises ValueError (diffusers builds a degenerate schedule); fewer than
4 steps with the PRK warm-up raise a ValueError that says why (diffusers: a numpy broadcast
error); ``step`` before ``set_timesteps`` raises ValueError in PRK mode too (diffusers: TypeError).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..configuration import register_to_config
from ..kernels import scheduler_step
from ..kernels import scheduler_step_coeffs as sc
from .alpha_bar_scheduler import AlphaBarScheduler
from .beta_schedules import make_betas
from .fused_step import like, step_inputs
from .registry import compatibles_of
from .scheduling_base import SchedulerOutput
from .timesteps import check_num_inference_steps, spaced_timesteps

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
RK4_WEIGHTS = (1 / 6, 1 / 3, 1 / 3, 1 / 6)  # of the four outputs of an RK4 step, last first (symmetric)


class PNDMScheduler(AlphaBarScheduler):
    """Pseudo linear multi-step sampler with a Runge-Kutta warm-up (Liu et al. 2022, alg. 2).

    Args:
        num_train_timesteps: number T of diffusion steps the model was trained with.
        beta_start, beta_end: first and last beta of the linear-type schedules.
        beta_schedule: linear, scaled_linear or squaredcos_cap_v2 (cosine).
        trained_betas: explicit betas; overrides the three arguments above.
        skip_prk_steps: start with PLMS right away (latent diffusion's PLMS sampler).
        set_alpha_to_one: alpha-bar after the last step is 1 (else alpha-bar_0).
        prediction_type: epsilon or v_prediction.
        timestep_spacing: linspace, leading or trailing (Lin et al. 2024, table 2).
        steps_offset: added to the leading-spaced timesteps.
    """

    _compatibles = compatibles_of("PNDMScheduler")

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Sequence[float] | np.ndarray | None = None,
                 skip_prk_steps: bool = False, set_alpha_to_one: bool = False, prediction_type: str = "epsilon",
                 timestep_spacing: str = "leading", steps_offset: int = 0):
        betas = make_betas(type(self).__name__, beta_schedule, num_train_timesteps, beta_start, beta_end,
                           trained_betas, BETA_SCHEDULES)
        self._init_tables(betas)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.pndm_order = 4  # PLMS order and RK4 stages
        # running state of a run
        self.counter = 0  # model calls so far
        self.ets: list[torch.Tensor] = []  # one model output per completed step, oldest first (at most 4 used)
        self.cur_sample: torch.Tensor | None = None  # x at the start of the step being computed
        self.prk_model_outputs: list[torch.Tensor] = []  # the current RK4 step's outputs, oldest first
        # set by set_timesteps
        self.num_inference_steps: int | None = None
        self._timesteps = np.arange(0, num_train_timesteps)[::-1].copy()
        self.prk_timesteps: np.ndarray | None = None
        self.plms_timesteps: np.ndarray | None = None
        self.timesteps: torch.Tensor | None = None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Lay out the model calls of a run and reset the running state.

        The n spaced timesteps t_{n-1} > ... > t_0 give, with h = T // n // 2:
        PRK: [s, e + h, e + h, e] for each gap (s, e) = (t_{n-1}, t_{n-2}), (t_{n-2}, t_{n-3}),
        (t_{n-3}, t_{n-4}), then PLMS on t_{n-4} ... t_0; PLMS only: t_{n-1}, t_{n-2} twice, t_{n-3} ... t_0.
        """
        T = self.config.num_train_timesteps
        n = check_num_inference_steps(num_inference_steps, T)
        if n < self.pndm_order and not self.config.skip_prk_steps:
            raise ValueError(f"the PRK warm-up spans {self.pndm_order} timesteps, so num_inference_steps must be "
                             f"at least {self.pndm_order}; got {n} (or set skip_prk_steps=True)")
        self.num_inference_steps = n
        desc = spaced_timesteps(T, n, self.config.timestep_spacing, self.config.steps_offset)
        self._timesteps = desc[::-1].copy()  # ascending
        if self.config.skip_prk_steps:
            self.prk_timesteps = np.array([], dtype=np.int64)
            self.plms_timesteps = np.concatenate([desc[:2], desc[1:]])
        else:
            half = T // n // 2
            starts, ends = desc[:self.pndm_order - 1], desc[1:self.pndm_order]
            self.prk_timesteps = np.array([t for s, e in zip(starts, ends) for t in (s, e + half, e + half, e)],
                                          dtype=np.int64)
            self.plms_timesteps = desc[3:].copy()
        timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self._set_run_timesteps(torch.from_numpy(timesteps), device)
        self.ets, self.prk_model_outputs, self.counter = [], [], 0

    def _check_ready(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step(): it lays out the PRK "
                             "and PLMS calls")

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             return_dict: bool = True) -> SchedulerOutput | tuple[torch.Tensor]:
        """The next sample: a PRK call during the warm-up, a PLMS call after it.

        Returns ``SchedulerOutput(prev_sample)``, or ``(prev_sample,)``.
        """
        self._check_ready()
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            return self.step_prk(model_output, timestep, sample, return_dict=return_dict)
        return self.step_plms(model_output, timestep, sample, return_dict=return_dict)

    def step_prk(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
                 return_dict: bool = True) -> SchedulerOutput | tuple[torch.Tensor]:
        """One of the four model calls of an RK4 step (``counter % 4`` says which)."""
        self._check_ready()
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        stage = self.counter % 4
        # 1. transfer from the RK4 step's start t: calls 0 and 1 go to the midpoint, 2 and 3 to the end
        #    (the target is the passed timestep, less ratio // 2 on even calls)
        prev_t = int(timestep) - (0 if self.counter % 2 else ratio // 2)
        t = int(self.prk_timesteps[self.counter - stage])
        # 2. eps: this call's output alone, or the RK4 combination on the last call (eq. 13)
        weights = RK4_WEIGHTS if stage == 3 else (1.0,)
        coeffs = self._coeffs(t, prev_t, weights)
        if stage == 0:
            self.ets.append(model_output)
            self.cur_sample = sample
            self.prk_model_outputs = []
        self.prk_model_outputs.append(model_output)
        history = self.prk_model_outputs[-2::-1] if stage == 3 else []
        start = self.cur_sample if self.cur_sample is not None else sample
        prev = self._transfer(start, model_output, coeffs, history)
        self.counter += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def step_plms(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
                  return_dict: bool = True) -> SchedulerOutput | tuple[torch.Tensor]:
        """One linear multi-step call (eq. 12), of the highest order the history allows (at most 4)."""
        self._check_ready()
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError(f"{type(self).__name__} can only run PLMS steps after its 12 PRK warm-up calls "
                             "(call step(), which runs them first, or set skip_prk_steps=True)")
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        t, prev_t = int(timestep), int(timestep) - ratio
        # 1. the history after this call; the second call of a PLMS-only run redoes the first step
        ets = self.ets
        if self.counter != 1:
            ets = ets[-3:] + [model_output]
        else:
            t, prev_t = t + ratio, t
        # 2. the outputs to combine (newest first), their weights, and the sample to move
        if len(ets) == 1 and self.counter == 0:  # Euler step; remember where it started
            weights, newest, history, start = (1.0,), model_output, [], sample
        elif len(ets) == 1 and self.counter == 1:  # the same step again with the mean of both outputs
            weights, newest, history = (0.5, 0.5), model_output, [ets[-1]]
            start = self.cur_sample if self.cur_sample is not None else sample
        else:  # Adams-Bashforth over the history (its newest entry is this call's output)
            order = min(len(ets), self.pndm_order)
            weights, newest, history, start = sc.plms_weights(order), ets[-1], ets[-2:-order - 1:-1], sample
        coeffs = self._coeffs(t, prev_t, weights)
        # 3. commit the state, then one fused transfer
        self.ets = ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            self.cur_sample = None
        prev = self._transfer(start, newest, coeffs, history)
        self.counter += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _coeffs(self, t: int, prev_t: int, weights: Sequence[float]) -> sc.StepCoeffs:
        """Coefficients of phi(x_t, sum_j w_j eps_j, t, prev_t) (eq. 11)."""
        alpha_prod_t = self._alpha_bar(t, 1.0)
        alpha_prod_t_prev = self._alpha_bar(prev_t, float(self.final_alpha_cumprod))
        if alpha_prod_t <= 0:
            raise ValueError(f"alpha-bar is 0 at timestep {t}; PNDM's transfer needs alpha-bar > 0")
        return sc.pndm(alpha_prod_t, alpha_prod_t_prev, weights, prediction_type=self.config.prediction_type)

    @staticmethod
    def _transfer(sample: torch.Tensor, newest: torch.Tensor, coeffs: sc.StepCoeffs,
                  history: Sequence[torch.Tensor]) -> torch.Tensor:
        x, m = step_inputs(sample, newest)
        return scheduler_step(x, m, coeffs, history=[like(h, x) for h in history])
