"""SigmaScheduler: the base of the sigma-parameterised samplers (Euler, Euler ancestral, Heun, LMS).

They step the variance-exploding view of the discrete alpha-bar schedule, x = x0 + sigma*eps with
sigma_t = sqrt((1 - alpha-bar_t)/alpha-bar_t) (Karras et al. 2022, arXiv:2206.00364, table 1), on a
run of noise levels sigma_0 > ... > sigma_{n-1} > sigma_n (0, or the smallest trained sigma):

    timesteps   spaced over [0, T) (linspace: fractional), or the fractional t whose log-sigma
                interpolates the table's when the levels are resampled (Karras' rho schedule,
                an exponential one); float32, as diffusers
    sigmas      float32 on the CPU, one more than the steps of the run (two with Euler's log_linear
                interpolation, as diffusers: the run then ends at the smallest trained sigma)
    model input x / sqrt(sigma^2 + 1), which has unit variance when x0 does (scale_model_input)

A run is followed by a step index: the first ``step`` (or ``scale_model_input``) finds its timestep
in the schedule, or starts at ``set_begin_index(k)``, and every ``step`` advances it by one, so an
img2img run that starts mid-schedule uses the same sigmas as diffusers. Forward noising
(``add_noise``) is x0 + sigma*noise at the sigma of the run's current index.

Same tables, indices and timesteps as diffusers' schedulers of the same names (DESIGN.md,
decision 4). Differences: a timestep that is not in the schedule, or a step after the run has
ended, raises ValueError (diffusers: IndexError); ``num_inference_steps`` above
``num_train_timesteps`` is refused except for the linspace spacing (fractional timesteps);
beta-distributed sigmas (use_beta_sigmas) are not implemented; ``get_velocity`` is the variance-
preserving one of the alpha-bar table at integer timesteps (diffusers' Euler looks the timestep up
in the run's schedule and reads the table at that position).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..kernels import scheduler_step
from ..kernels.scheduler_step_coeffs import PREDICTION_TYPES, StepCoeffs
from ..utils.torch_utils import to_device
from .alpha_bar_scheduler import AlphaBarScheduler
from .beta_schedules import ZERO_SNR_ALPHA_BAR
from .fused_step import like, step_inputs
from .scheduling_base import SchedulerOutput, StepIndexMixin
from .sigma_schedules import FINAL_SIGMAS_TYPES, resample_sigmas, sigma_to_t, sigmas_from_alphas_cumprod
from .timesteps import TIMESTEP_SPACINGS, check_num_inference_steps, spaced_timesteps

logger = logging.getLogger(__name__)

INTERPOLATION_TYPES = ("linear", "log_linear")
TIMESTEP_TYPES = ("discrete", "continuous")

Timestep = float | torch.Tensor


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def sigma_schedule_of(use_karras_sigmas: bool | None, use_exponential_sigmas: bool | None,
                      use_beta_sigmas: bool | None) -> str | None:
    """The resampling of a run's noise levels that the config's flags ask for: karras, exponential or None."""
    if sum(bool(f) for f in (use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)) > 1:
        raise ValueError("only one of use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas can be set")
    if use_beta_sigmas:
        raise NotImplementedError("use_beta_sigmas (Lee et al. 2024, 'Beta Sampling is All You Need') is not "
                                  "implemented in fusediff; use use_karras_sigmas or use_exponential_sigmas")
    if use_karras_sigmas:
        return "karras"
    return "exponential" if use_exponential_sigmas else None


class SigmaScheduler(StepIndexMixin, AlphaBarScheduler):
    """Base of the samplers that step noise levels sigma over a discrete alpha-bar table.

    A subclass builds its betas, calls :meth:`_init_sigma_tables` with its options, installs the
    initial schedule (diffusers' Euler: the whole table; Heun, LMS: ``set_timesteps(T)``), and ends
    each ``step`` in :meth:`_fused` and :meth:`_finish`.
    """

    order = 1
    is_scale_input_called = False

    def _init_sigma_tables(self, betas: torch.Tensor, *, prediction_type: str, timestep_spacing: str,
                           rescale_betas_zero_snr: bool = False, sigma_schedule: str | None = None,
                           interpolation_type: str = "linear", sigma_min: float | None = None,
                           sigma_max: float | None = None, final_sigmas_type: str = "zero",
                           timestep_type: str = "discrete") -> None:
        """Check the options, build alpha-bar and the trained sigma table, and reset the run state."""
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("interpolation_type", interpolation_type, INTERPOLATION_TYPES)
        _check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
        _check_choice("timestep_type", timestep_type, TIMESTEP_TYPES)
        self._init_tables(betas, rescale_betas_zero_snr, ZERO_SNR_ALPHA_BAR)
        # sigma_t of the table, (T,) float32 ascending in t
        self._train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod).numpy()
        self._sigma_schedule, self._interpolation = sigma_schedule, interpolation_type
        self._sigma_bounds, self._final_sigmas_type = (sigma_min, sigma_max), final_sigmas_type
        # timesteps are 0.25 log(sigma) (EDM's c_noise) for continuous-time v-prediction models
        self._log_sigma_timesteps = timestep_type == "continuous" and prediction_type == "v_prediction"
        self.num_inference_steps: int | None = None
        self._sigma_cache: tuple[Any, list[float]] = (None, [])
        self._begin_index: int | None = None
        self._step_index: int | None = None

    def _install_train_schedule(self, timesteps_dtype: torch.dtype = torch.float32) -> None:
        """The initial run of diffusers' Euler schedulers: every trained timestep, T-1 down to 0."""
        T = len(self._train_sigmas)
        self._install(np.arange(T - 1, -1, -1, dtype=np.float32), np.append(self._train_sigmas[::-1], 0.0), None)
        self.timesteps = self.timesteps.to(timesteps_dtype)

    # -- the run's schedule ------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: Sequence[float] | None = None, sigmas: Sequence[float] | None = None) -> None:
        """Lay out a run of ``num_inference_steps`` steps, or of the given ``timesteps`` or ``sigmas``.

        ``timesteps`` (descending, in [0, T)) get their sigmas by interpolation; ``sigmas`` (descending,
        n + 1 values, the last where the run ends) get fractional timesteps.
        """
        self._set_timesteps(num_inference_steps, device, timesteps=timesteps, sigmas=sigmas)

    def _set_timesteps(self, num_inference_steps: int | None, device: str | torch.device | None, *,
                       timesteps: Sequence[float] | None = None, sigmas: Sequence[float] | None = None,
                       num_train_timesteps: int | None = None) -> None:
        given = [name for name, v in (("timesteps", timesteps), ("sigmas", sigmas)) if v is not None]
        if (num_inference_steps is None) == (not given) or len(given) > 1:
            raise ValueError("set_timesteps takes exactly one of num_inference_steps, timesteps or sigmas")
        if timesteps is not None and self._sigma_schedule is not None:
            raise ValueError(f"custom timesteps cannot be used with {self._sigma_schedule} sigmas: those pick "
                             "their own timesteps")
        if timesteps is not None and self._log_sigma_timesteps:
            raise ValueError("custom timesteps cannot be used with timestep_type='continuous' and v_prediction: "
                             "the timesteps are 0.25 log(sigma); pass sigmas instead")
        log_table = np.log(self._train_sigmas)
        if sigmas is not None:
            levels = self._custom_levels(sigmas, "sigmas", 2)
            ts, n = sigma_to_t(levels[:-1], log_table), len(levels) - 1
        else:
            T = num_train_timesteps or self.config.num_train_timesteps
            if timesteps is not None:
                ts = self._custom_levels(timesteps, "timesteps", 1)
                n = len(ts)
            else:
                spacing = self.config.timestep_spacing
                n = check_num_inference_steps(num_inference_steps, T if spacing != "linspace" else math.inf)
                ts = (np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy() if spacing == "linspace" else
                      spaced_timesteps(T, n, spacing, self.config.steps_offset).astype(np.float32))
            ts, levels = self._levels_of(ts, n, log_table)
        self.num_inference_steps = n
        self._install(ts, levels, device)

    @staticmethod
    def _custom_levels(values: Sequence[float], name: str, at_least: int) -> np.ndarray:
        arr = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
        if arr.ndim != 1 or len(arr) < at_least or not np.isfinite(arr).all():
            raise ValueError(f"{name} must be a 1-D sequence of at least {at_least} finite values; got {values!r}")
        return arr.astype(np.float32)

    def _levels_of(self, ts: np.ndarray, n: int, log_table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, sigmas) of a run over timesteps ``ts``: n + 1 sigmas, or n + 2 with log_linear."""
        table = self._train_sigmas
        if self._interpolation == "linear":
            levels = np.interp(ts, np.arange(len(table)), table)
        else:  # log_linear: n + 1 levels uniform in log sigma over the whole table, whatever the timesteps
            levels = torch.linspace(float(np.log(table[-1])), float(np.log(table[0])), n + 1).exp().numpy()
        if self._sigma_schedule is not None:
            levels = resample_sigmas(levels, n, self._sigma_schedule, *self._sigma_bounds)
            ts = sigma_to_t(levels, log_table)
        final = table[0] if self._final_sigmas_type == "sigma_min" else 0.0
        return ts, np.append(levels, final)

    def _install(self, timesteps: np.ndarray, sigmas: np.ndarray, device: str | torch.device | None) -> None:
        """Store the run's tables and reset its state; Heun overrides it to double them."""
        sigmas_t = torch.from_numpy(np.asarray(sigmas).astype(np.float32))  # kept on the CPU: read every step
        if self._log_sigma_timesteps:
            self._set_run_timesteps(0.25 * sigmas_t[:-1].log(), device)
        else:
            self._set_run_timesteps(torch.from_numpy(np.asarray(timesteps).astype(np.float32)), device)
        self.sigmas = sigmas_t
        self._step_index = self._begin_index = None
        self.is_scale_input_called = False
        self._reset_run()

    def _reset_run(self) -> None:
        """Forget the multistep state of the previous run (Heun's first stage, LMS' derivatives)."""

    def _sigma(self, i: int) -> float:
        """sigmas[i] as a Python float, from a list refreshed when ``sigmas`` is replaced."""
        if self.sigmas is not self._sigma_cache[0]:
            self._sigma_cache = (self.sigmas, self.sigmas.double().tolist())
        return self._sigma_cache[1][i]

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """Standard deviation of the initial noise: sigma_max, or sqrt(sigma_max^2 + 1) for leading spacing."""
        sigma_max = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return sigma_max
        return (sigma_max**2 + 1) ** 0.5

    # -- the step index ----------------------------------------------------------------------
    def _begin_index_limit(self) -> int | None:
        return None  # a run with no step left (Heun's 2n for 2n - 1 calls) is accepted; step refuses it

    def _init_step_index(self, timestep: Timestep | None) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
        elif timestep is None:
            raise ValueError("the run's first scale_model_input or step needs its timestep (or set_begin_index)")
        else:
            self._step_index = self.index_for_timestep(timestep)

    def _begin_step(self, timestep: Timestep) -> int:
        """The index of this step: found from ``timestep`` on the run's first step; checked to be in the run."""
        if not self.is_scale_input_called:
            logger.warning("%s.step was called without scale_model_input; the model input should be "
                           "x / sqrt(sigma^2 + 1)", type(self).__name__)
            self.is_scale_input_called = True  # warn once per run
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= len(self.timesteps):
            raise ValueError(f"the run of {len(self.timesteps)} steps has ended; call set_timesteps to start another")
        return self._step_index

    @staticmethod
    def _refuse_index(timestep: Timestep) -> None:
        """Refuse integer timesteps, which are usually loop indices (enumerate) rather than timesteps."""
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(f"step got the integer timestep {timestep!r}: pass one of scheduler.timesteps (floats), "
                             "not an index into them")

    # -- model input, forward noising, the fused step ------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep: Timestep | None = None) -> torch.Tensor:
        """The model input x / sqrt(sigma^2 + 1) at this step's sigma (Karras et al. 2022, table 1, c_in)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]  # float32, as diffusers divides
        self.is_scale_input_called = True
        return sample / (sigma**2 + 1) ** 0.5

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x0 + sigma*noise: at each timestep's sigma in the schedule, or at the run's begin or current index."""
        timesteps = torch.as_tensor(timesteps).reshape(-1)
        sigma = self.sigmas[self._noise_indices(timesteps, self.sigmas.device)]  # looked up on the host
        sigma = to_device(sigma.to(original_samples.dtype), original_samples.device)
        return original_samples + noise * sigma.reshape((-1,) + (1,) * (original_samples.dim() - 1))  # (B, 1, ..., 1)

    @staticmethod
    def _upcast(sample: torch.Tensor, model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both inputs in the model output's dtype, at least float32 (Euler's compute dtype, as diffusers)."""
        x, m = step_inputs(sample, model_output)
        dtype = torch.promote_types(model_output.dtype, torch.float32)
        return (x, m) if x.dtype == dtype else (x.to(dtype), m.to(dtype))

    @staticmethod
    def _fused(x: torch.Tensor, m: torch.Tensor, coeffs: StepCoeffs, *, noise: torch.Tensor | None = None,
               history: Sequence[torch.Tensor] = (), return_pred: bool = True):
        """(out, x0) of one fused op (out alone without ``return_pred``); history in x's dtype and layout."""
        return scheduler_step(x, m, coeffs, noise=noise, history=[like(h, x) for h in history],
                              return_pred=return_pred)

    def _finish(self, prev: torch.Tensor, x0: torch.Tensor, return_dict: bool):
        """Advance the step index; the step's output in the requested form."""
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)
