"""MultistepScheduler: the base of the multistep ODE solvers over a discrete VP schedule, DPM-Solver and
DPM-Solver++ (Lu et al. 2022, arXiv:2206.00927 and arXiv:2211.01095), DEIS (Zhang & Chen 2023,
arXiv:2204.13902) and UniPC (Zhao et al. 2023, arXiv:2302.04867).

Notation (DPM-Solver++, sec. 2): the forward process is x = alpha_t x0 + sigma_t eps over the float32
alpha-bar table of DDPM, with alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and the half log-SNR
lambda_t = log alpha_t - log sigma_t. A run visits the noise levels ``self.sigmas`` of the
variance-exploding view, sigma = sigma_t / alpha_t = sqrt((1 - abar) / abar) (float32, the values
diffusers holds), and maps each back with :meth:`MultistepScheduler._sigma_to_alpha_sigma_t`:
alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha, so that lambda = -log(sigma).

A step converts the model output m into the solver's variable D (the data prediction x0, or the
noise prediction eps), keeps the last ``solver_order`` of them, and combines D, the history and
the sample in one fused op (:func:`fusediff.kernels.scheduler_step`): its x0 slot computes
D = p_x*x + p_m*m and its history slots hold the earlier D, most recent first
(:meth:`MultistepScheduler.multistep_update`). With dynamic thresholding a first fused call yields the
thresholded x0 (the op's ``threshold`` argument), and the update takes it from a history slot: eps
solvers re-derive eps from it, which the op's single-call form (c_x0 times the thresholded x0) does
not express.

Same timesteps, sigmas, step-index rules and ``add_noise`` as diffusers' multistep schedulers
(DESIGN.md, decision 4); the subclass sets the few policies in which they differ (the final sigma,
rounding of resampled timesteps, the last trained timestep). Differences from diffusers: a timestep
that is not in the schedule raises ValueError (diffusers silently takes the last step); ``add_noise``
before ``set_timesteps`` uses the trained sigma of each timestep (diffusers indexes its ascending
table with positions in the descending timesteps); flow-matching and beta sigmas are not
implemented (NotImplementedError).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..kernels import DynamicThreshold, scheduler_step
from ..kernels.scheduler_step_coeffs import StepCoeffs, prediction_coeffs, vp_from_sigma
from ..utils.torch_utils import to_device
from .beta_schedules import ZERO_SNR_ALPHA_BAR, alpha_bar_tables
from .fused_step import like, step_inputs
from .scheduling_base import SchedulerMixin, StepIndexMixin
from .sigma_schedules import FINAL_SIGMAS_TYPES, resample_sigmas, sigma_to_t, sigmas_from_alphas_cumprod
from .timesteps import TIMESTEP_SPACINGS, check_num_inference_steps, multistep_timesteps

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
MULTISTEP_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class MultistepScheduler(StepIndexMixin, SchedulerMixin):
    """Base of the multistep solvers: tables, timesteps and sigmas, step index, conversion, fused update.

    A subclass's ``__init__`` (decorated with ``@register_to_config``) calls :meth:`_init_multistep`;
    its ``step`` calls :meth:`_begin_step`, :meth:`_step_order`, :meth:`multistep_update` (or
    :meth:`convert_model_output`), :meth:`_remember` and :meth:`_end_step`. Policies to override:
    :meth:`_final_sigma`, :meth:`_round_resampled_timesteps`, :meth:`_last_timestep`.

    State of a run (diffusers' names): ``timesteps`` (int64, descending), ``sigmas`` (float32, one
    more than timesteps: the level after the last step), ``num_inference_steps``, ``model_outputs``
    (the last ``solver_order`` converted outputs, oldest first, None where empty), ``lower_order_nums``
    (steps taken, capped at solver_order), ``step_index`` and ``begin_index``.
    """

    order = 1
    init_noise_sigma = 1.0

    # -- construction ---------------------------------------------------------------------------
    def _init_multistep(self, betas: torch.Tensor, solver_order: int, rescale_betas_zero_snr: bool = False) -> None:
        """Build the tables from float32 ``betas`` and reset the run state.

        Sets betas, alphas, alphas_cumprod (float32, the last set to 2^-24 for zero-SNR betas so that
        sigma stays finite), lambda_t and ``sigmas``
        (the trained levels, ascending, until ``set_timesteps``).
        """
        if isinstance(solver_order, bool) or solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3; got {solver_order!r}")
        if betas.dim() != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-D sequence of at least 2 values; got shape {tuple(betas.shape)}")
        self.betas, self.alphas, self.alphas_cumprod = alpha_bar_tables(betas, rescale_betas_zero_snr,
                                                                        ZERO_SNR_ALPHA_BAR)
        # half log-SNR lambda_t = log alpha_t - log sigma_t of the table, as diffusers computes it
        self.lambda_t = torch.log(torch.sqrt(self.alphas_cumprod)) - torch.log(torch.sqrt(1 - self.alphas_cumprod))
        self.sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        T = len(betas)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=np.float32)[::-1].copy())
        self.model_outputs: list[torch.Tensor | None] = [None] * solver_order
        self.lower_order_nums = 0
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def _check_config(self) -> None:
        """Refuse config values this implementation does not take, naming them."""
        c = self.config
        chosen = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if c.get(k)]
        if len(chosen) > 1:
            raise ValueError(f"only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set; "
                             f"got {', '.join(chosen)}")
        for key in ("use_beta_sigmas", "use_flow_sigmas", "use_dynamic_shifting"):
            if c.get(key):
                raise NotImplementedError(f"{type(self).__name__}: {key}=True is not implemented in fusediff")
        if c.get("prediction_type") not in MULTISTEP_PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(MULTISTEP_PREDICTION_TYPES)} "
                             f"(flow_prediction is not implemented); got {c.get('prediction_type')!r}")
        if c.get("timestep_spacing") not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}; "
                             f"got {c.get('timestep_spacing')!r}")
        if c.get("final_sigmas_type", "zero") not in FINAL_SIGMAS_TYPES:
            raise ValueError(f"final_sigmas_type must be one of {', '.join(FINAL_SIGMAS_TYPES)}; "
                             f"got {c.get('final_sigmas_type')!r}")

    # -- timesteps and sigmas -------------------------------------------------------------------
    def _sigma_schedule(self) -> str | None:
        """The resampled noise levels the config asks for (karras, exponential, lu), or None."""
        for key, name in (("use_karras_sigmas", "karras"), ("use_lu_lambdas", "lu"),
                          ("use_exponential_sigmas", "exponential")):
            if self.config.get(key):
                return name
        return None

    def _last_timestep(self) -> int:
        """One past the largest timestep a run may start from (T; DPM-Solver clips it by lambda)."""
        return self.config.num_train_timesteps

    def _round_resampled_timesteps(self, schedule: str) -> bool:
        """Whether the fractional timesteps of resampled sigmas are rounded (else truncated)."""
        return schedule == "karras"

    def _trained_sigma_min(self) -> float:
        """sigma at t = 0 of the float32 table, computed as diffusers computes it."""
        return float(sigmas_from_alphas_cumprod(self.alphas_cumprod[0]))

    def _final_sigma(self, sigmas: np.ndarray, schedule: str | None) -> float:
        """The level after the last step: 0 for final_sigmas_type 'zero'; for 'sigma_min' the last
        resampled level, or the trained sigma at t = 0 when the levels are not resampled."""
        if self.config.get("final_sigmas_type", "zero") == "zero":
            return 0.0
        return float(sigmas[-1]) if schedule is not None else self._trained_sigma_min()

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: Sequence[int] | None = None) -> None:
        """Choose the run's timesteps and noise levels, and reset the solver's state.

        Args:
            num_inference_steps: number of steps, spaced by ``timestep_spacing``, or resampled as
                Karras et al. 2022 (eq. 5), exponentially, or uniformly in lambda (``use_lu_lambdas``).
            device: where ``timesteps`` go (``sigmas`` stay on the CPU, as diffusers keeps them).
            timesteps: explicit descending timesteps instead of ``num_inference_steps``.
        """
        T = self.config.num_train_timesteps
        schedule = self._sigma_schedule()
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("set_timesteps takes exactly one of num_inference_steps and timesteps")
        table = sigmas_from_alphas_cumprod(self.alphas_cumprod).numpy()  # float32, t ascending
        log_table = np.log(table)
        if timesteps is not None:
            if schedule is not None:
                raise ValueError(f"explicit timesteps cannot be combined with {schedule} sigmas")
            ts = np.asarray(timesteps)
            if ts.ndim != 1 or ts.size == 0 or ts.min() < 0 or ts.max() >= T or np.any(np.diff(ts) >= 0):
                raise ValueError(f"timesteps must be a non-empty strictly descending sequence in [0, {T}); "
                                 f"got {list(timesteps)}")
            ts = ts.astype(np.int64)
        else:
            n = check_num_inference_steps(num_inference_steps, T)
            ts = multistep_timesteps(T, n, self.config.timestep_spacing, self.config.steps_offset,
                                     self._last_timestep())
        if schedule is None:
            sigmas = np.interp(ts, np.arange(0, len(table)), table)
        else:
            if schedule == "lu":  # uniform in lambda = -log(sigma) (DPM-Solver, Lu et al. 2022)
                lam_min, lam_max = float(log_table[0]), float(log_table[-1])
                sigmas = np.exp(lam_max + np.linspace(0, 1, len(ts)) * (lam_min - lam_max))
            else:
                sigmas = resample_sigmas(table[::-1].copy(), len(ts), schedule, self.config.get("sigma_min"),
                                         self.config.get("sigma_max"))
            ts = sigma_to_t(sigmas, log_table)
            if self._round_resampled_timesteps(schedule):
                ts = ts.round()
        final = self._final_sigma(sigmas, schedule)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [final]]).astype(np.float32))
        self._set_run_timesteps(torch.from_numpy(ts).to(torch.int64), device)
        self.num_inference_steps = len(ts)
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def _begin_step(self, timestep: int | torch.Tensor) -> int:
        """Check that a run is set up, fix the step index on the first step, and return it."""
        if self.num_inference_steps is None:
            raise ValueError(f"call set_timesteps before step(): {type(self).__name__} steps between the "
                             "noise levels it chooses there")
        if self._step_index is None:
            self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index
        if self._step_index >= len(self.timesteps):
            raise ValueError(f"the run of {len(self.timesteps)} steps is over; call set_timesteps for a new one")
        return self._step_index

    def _step_order(self, lower_order_final: bool, final_first_order: bool = False) -> int:
        """Order of this step: solver_order, lower while the history fills up, and lower at the end
        of short runs (< 15 steps) with ``lower_order_final``; ``final_first_order`` forces order 1
        on the last step."""
        i, n, order = self._step_index, len(self.timesteps), self.config.solver_order
        short = lower_order_final and n < 15
        if i == n - 1 and (short or final_first_order):
            return 1
        cap = 2 if (i == n - 2 and short) else order
        return min(order, cap, self.lower_order_nums + 1)

    def _remember(self, converted: torch.Tensor) -> None:
        """Append this step's converted output to ``model_outputs`` (dropping the oldest)."""
        self.model_outputs = self.model_outputs[1:] + [converted]

    def _history(self, order: int) -> list[torch.Tensor]:
        """The last order - 1 converted outputs, most recent first (call before :meth:`_remember`)."""
        found = [self.model_outputs[-1 - j] for j in range(order - 1)]
        if any(h is None for h in found):
            raise RuntimeError(f"an order-{order} step needs {order - 1} earlier model outputs")
        return found

    def _end_step(self) -> None:
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        self._step_index += 1

    # -- model output -> x0 or eps --------------------------------------------------------------
    def _sigma_to_alpha_sigma_t(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) of VE noise level(s) sigma: alpha_t = 1/sqrt(sigma^2 + 1), sigma_t = sigma*alpha_t."""
        alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha_t, sigma * alpha_t

    def alpha_sigma(self, index: int) -> tuple[float, float]:
        """(alpha_t, sigma_t) of ``sigmas[index]`` as float64 Python floats (for coefficients)."""
        return vp_from_sigma(float(self.sigmas[index]))

    def _split_variance(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The mean part of a model output that also predicts a variance (``variance_type`` learned)."""
        if self.config.get("variance_type") in ("learned", "learned_range"):
            c = sample.shape[1]
            if model_output.dim() < 2 or model_output.shape[1] != 2 * c:
                raise ValueError(f"variance_type={self.config.variance_type!r} needs a model output with 2 x {c} "
                                 f"channels (mean, variance); got shape {tuple(model_output.shape)}")
            return model_output[:, :c]
        return model_output

    def _thresholds(self, predict_x0: bool, threshold_eps: bool) -> bool:
        """Whether x0 is thresholded on the way to the converted output."""
        return bool(self.config.thresholding) and (predict_x0 or threshold_eps)

    def multistep_update(self, sample: torch.Tensor, model_output: torch.Tensor, coeffs: StepCoeffs,
                         history: Sequence[torch.Tensor] = (), noise: torch.Tensor | None = None, *,
                         predict_x0: bool = True, threshold_eps: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_next, D): one solver update, with D this step's converted output (x0 or eps).

        ``coeffs`` in the fused op's terms: p_x, p_m give D from the sample and the model output (no
        clip), c_x0 weighs D, c_h0.. weigh ``history`` (earlier D, most recent first), c_x the sample
        and c_n ``noise``. The call is one fused op; with ``thresholding`` (applied to x0, and for an
        eps solver with ``threshold_eps`` eps re-derived from it, as diffusers does) it is:
            1. x0 = x0-coefficients . (x, m)       (fused, with 2)
            2. x0 <- threshold(x0)                  (the op's ``threshold``: diffusers' _threshold_sample)
            3. D = x0, or eps = (x - alpha x0)/sigma (fused)
            4. out = c_x x + c_n n + c_x0 D + sum_j c_hj h_j, with D in the first history slot (fused)
        """
        model_output = self._split_variance(model_output, sample)
        x, m = step_inputs(sample, model_output)
        hist = [like(h, x) for h in history]
        n = like(noise, x) if noise is not None else None
        if not self._thresholds(predict_x0, threshold_eps):
            return scheduler_step(x, m, coeffs, noise=n, history=hist, return_pred=True)
        if coeffs.c_h3 or len(hist) > 3:
            raise ValueError("a thresholded update takes at most 3 history tensors")
        converted = self._thresholded(x, m, predict_x0)
        rest = coeffs._replace(p_x=0.0, p_m=0.0, p_n=0.0, c_x0=0.0, c_m=0.0, clip=0.0, c_h0=coeffs.c_x0,
                               c_h1=coeffs.c_h0, c_h2=coeffs.c_h1, c_h3=coeffs.c_h2)
        return scheduler_step(x, m, rest, noise=n, history=[converted, *hist]), converted

    def _thresholded(self, x: torch.Tensor, m: torch.Tensor, predict_x0: bool) -> torch.Tensor:
        """D from the thresholded x0 (steps 1-3 of :meth:`multistep_update`)."""
        alpha, sigma = self.alpha_sigma(self._step_index)
        p_x, p_m = prediction_coeffs(alpha, sigma, self.config.prediction_type, predict_x0=True)
        threshold = DynamicThreshold(self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        _, x0 = scheduler_step(x, m, StepCoeffs(p_x=p_x, p_m=p_m), threshold=threshold, return_pred=True)
        if predict_x0:
            return x0
        return scheduler_step(x, x0, StepCoeffs(p_x=1.0 / sigma, p_m=-alpha / sigma, c_x0=1.0))

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor, *, predict_x0: bool = True,
                             threshold_eps: bool = True) -> torch.Tensor:
        """The model output at the current step as x0 (``predict_x0``) or eps, thresholded if configured.

        Uses ``step_index`` (the step being taken), like diffusers' method of the same name.
        """
        if self._step_index is None:
            raise ValueError("convert_model_output needs the step index: call it from step(), after the first "
                             "step of a run, or after set_begin_index")
        model_output = self._split_variance(model_output, sample)
        x, m = step_inputs(sample, model_output)
        if self._thresholds(predict_x0, threshold_eps):
            return self._thresholded(x, m, predict_x0)
        alpha, sigma = self.alpha_sigma(self._step_index)
        p_x, p_m = prediction_coeffs(alpha, sigma, self.config.prediction_type, predict_x0)
        return scheduler_step(x, m, StepCoeffs(p_x=p_x, p_m=p_m, c_x0=1.0))

    # -- forward process ---------------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The model input at a timestep: the sample itself for these solvers."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """alpha_t x0 + sigma_t noise at the run's noise level of each timestep (the begin index's when set).

        Before ``set_timesteps`` the level is the trained one of each timestep.
        """
        timesteps = torch.as_tensor(timesteps).reshape(-1)
        if self.num_inference_steps is None:
            T = self.config.num_train_timesteps
            if timesteps.min() < 0 or timesteps.max() >= T:
                raise ValueError(f"timesteps must lie in [0, {T}); got {timesteps.tolist()}")
            indices = timesteps.long().tolist()
        else:
            indices = self._noise_indices(timesteps, self.sigmas.device)
        sigma = to_device(self.sigmas[indices].flatten().to(original_samples.dtype), original_samples.device)
        sigma = sigma.reshape(sigma.shape + (1,) * (original_samples.dim() - 1))  # (B, 1, ..., 1)
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma)
        return alpha_t * original_samples + sigma_t * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps

