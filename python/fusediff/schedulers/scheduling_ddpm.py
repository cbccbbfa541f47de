"""DDPM: ancestral sampling of denoising diffusion probabilistic models (Ho et al. 2020).

Each step goes from x_t to x_{t'} (t' = t - 1 on the full chain, the next timestep of a strided
run) by sampling the posterior q(x_{t'} | x_t, x0) with x0 predicted by the model:

    x_{t'} = c_x0 * x0 + c_x * x_t + sigma_t * z                                   (eq. 6, 7)
    c_x0 = sqrt(abar_t') beta_t / (1 - abar_t),  c_x = sqrt(alpha_t) (1 - abar_t') / (1 - abar_t)

where alpha_t = abar_t / abar_t' and beta_t = 1 - alpha_t span the whole stride. x0 is clipped
or dynamically thresholded (Saharia et al. 2022), and sigma_t is one of the variance types of
Nichol & Dhariwal 2021: fixed_small (beta-tilde_t), fixed_large (beta_t), their log forms,
learned (the model outputs the variance) or learned_range (the model interpolates log beta-tilde_t
and log beta_t, eq. 15). The update is one fused op (:func:`fusediff.kernels.scheduler_step`), with
learned_range and dynamic thresholding inside it:

- learned_range: sigma = exp(v_a + v_b*v) per element, v the second half of the model output's
  channels, (v_a, v_b) from :func:`~fusediff.kernels.scheduler_step_coeffs.ddpm_learned_range`. The
  two halves go to the op as views of the model output (no copies). ``learned`` (sigma = sqrt(v))
  is not of that form: the scheduler folds it into the noise in PyTorch.
- thresholding: ``threshold=(dynamic_thresholding_ratio, sample_max_value)``: per batch item,
  s = clamp(torch.quantile(|x0|, ratio), 1, sample_max_value) and x0 <- clamp(x0, -s, s)/s, with x0
  rounded to the model's dtype first and the quantile taken in float32, exactly as diffusers'
  ``_threshold_sample`` (on CUDA too, without a host sync).

Same config keys, defaults, timesteps and random draws as diffusers' ``DDPMScheduler``
(DESIGN.md, decisions 4 and 5). Differences, where diffusers fails silently or obscurely: an
unknown ``variance_type`` raises at construction (diffusers falls back to fixed_small);
``fixed_large_log`` adds noise of standard deviation sqrt(beta_t), i.e. exp(0.5 * log beta_t), where
diffusers takes the square root of the log and returns NaN; a timestep outside the schedule, a
learned variance type without the variance channels, and an epsilon prediction at alpha-bar_t = 0
raise ValueError. ``previous_timestep`` returns an int (diffusers: a tensor or an int). In float16
and bfloat16 the learned_range noise scale is computed in float32 and the update rounded once
(diffusers computes the log-variance, its exp and the sum in the model's dtype); x0, the quantile
and the thresholding are the same as diffusers'. There is no ``_threshold_sample`` method.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..configuration import register_to_config
from ..kernels import DynamicThreshold
from ..kernels import scheduler_step_coeffs as sc
from ..utils.torch_utils import randn_tensor
from .alpha_bar_scheduler import AlphaBarScheduler, check_alpha_bar
from .beta_schedules import make_betas
from .fused_step import fused_update, like, step_inputs
from .registry import compatibles_of
from .scheduling_base import SchedulerOutput
from .timesteps import check_num_inference_steps, spaced_timesteps

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")

DDPMSchedulerOutput = SchedulerOutput  # the name diffusers gives this scheduler's output


class DDPMScheduler(AlphaBarScheduler):
    """Denoising diffusion probabilistic model sampler (Ho et al. 2020, alg. 2).

    Args:
        num_train_timesteps: number T of diffusion steps the model was trained with.
        beta_start, beta_end: first and last beta of the linear-type schedules.
        beta_schedule: linear, scaled_linear, squaredcos_cap_v2 (cosine), laplace or sigmoid.
        trained_betas: explicit betas; overrides the three arguments above.
        variance_type: fixed_small, fixed_small_log, fixed_large, fixed_large_log, learned or
            learned_range (the last two read the variance from the second half of the model
            output's channels).
        clip_sample: clamp x0 to [-clip_sample_range, clip_sample_range].
        prediction_type: what the model predicts: epsilon, sample (x0) or v_prediction.
        thresholding: dynamic thresholding of x0 (replaces clip_sample), with
            ``dynamic_thresholding_ratio`` (the quantile) and ``sample_max_value`` (its cap).
        clip_sample_range: the clip bound.
        timestep_spacing: linspace, leading or trailing (Lin et al. 2024, table 2).
        steps_offset: added to the leading-spaced timesteps.
        rescale_betas_zero_snr: rescale betas to zero terminal SNR (Lin et al. 2024, alg. 1).
    """

    _compatibles = compatibles_of("DDPMScheduler")

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Sequence[float] | np.ndarray | None = None,
                 variance_type: str = "fixed_small", clip_sample: bool = True, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0,
                 timestep_spacing: str = "leading", steps_offset: int = 0, rescale_betas_zero_snr: bool = False):
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {', '.join(VARIANCE_TYPES)}; got {variance_type!r}")
        betas = make_betas(type(self).__name__, beta_schedule, num_train_timesteps, beta_start, beta_end,
                           trained_betas, BETA_SCHEDULES)
        self._init_tables(betas, rescale_betas_zero_snr)
        self.one = torch.tensor(1.0)  # alpha-bar before the first timestep
        self.variance_type = variance_type
        self.custom_timesteps = False
        self.num_inference_steps: int | None = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy())
        self._positions: tuple[Any, dict[int, int], list[int]] = (None, {}, [])

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: Sequence[int] | None = None) -> None:
        """Choose the timesteps of a run: ``num_inference_steps`` spaced by ``timestep_spacing``,
        or explicit descending ``timesteps`` in [0, num_train_timesteps)."""
        T = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("set_timesteps takes num_inference_steps or timesteps, not both")
        if timesteps is not None:
            ts = [int(t) for t in timesteps]
            if not ts:
                raise ValueError("custom timesteps must not be empty")
            if any(b >= a for a, b in zip(ts, ts[1:])):
                raise ValueError(f"custom timesteps must strictly decrease; got {ts}")
            if ts[0] >= T:
                raise ValueError(f"custom timesteps must be below num_train_timesteps = {T}; the first is {ts[0]}")
            if ts[-1] < 0:
                raise ValueError(f"custom timesteps must be >= 0; the last is {ts[-1]}")
            array = np.array(ts, dtype=np.int64)
            self.custom_timesteps = True
        else:
            n = check_num_inference_steps(num_inference_steps, T)
            array = spaced_timesteps(T, n, self.config.timestep_spacing, self.config.steps_offset)
            self.num_inference_steps = n
            self.custom_timesteps = False
        self._set_run_timesteps(torch.from_numpy(array), device)

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        """The timestep after ``timestep`` in this run (-1 after the last one)."""
        t = int(timestep)
        if not (self.custom_timesteps or self.num_inference_steps):
            return t - 1
        if self._positions[0] is not self.timesteps:  # index of each timestep, rebuilt when timesteps change
            order = [int(v) for v in self.host_timesteps.tolist()]
            first: dict[int, int] = {}
            for i, v in enumerate(order):
                first.setdefault(v, i)
            self._positions = (self.timesteps, first, order)
        _, first, order = self._positions
        if t not in first:
            raise ValueError(f"timestep {t} is not one of this run's timesteps (scheduler.timesteps)")
        i = first[t]
        return order[i + 1] if i + 1 < len(order) else -1

    def _noise_scale(self, alpha_prod_t: float, alpha_prod_t_prev: float,
                     predicted_variance: torch.Tensor | None) -> float | torch.Tensor:
        """sigma_t: a float for the fixed variance types, a tensor (per element) for ``learned``.
        learned_range is not here: its scale is computed in the fused op (see :meth:`step`)."""
        kind = self.variance_type
        if kind in ("fixed_small", "fixed_small_log", "fixed_large"):
            return sc.ddpm_noise_std(alpha_prod_t, alpha_prod_t_prev, kind)
        if kind == "fixed_large_log":  # log-variance log(beta_t): sigma = exp(0.5 log beta_t)
            return sc.ddpm_noise_std(alpha_prod_t, alpha_prod_t_prev, "fixed_large")
        if predicted_variance is None:
            raise ValueError(
                f"variance_type {kind!r} reads the variance from the model output, which must have twice the "
                "sample's channels (prediction, then variance)")
        if kind == "learned":  # the model outputs the variance itself
            return predicted_variance**0.5
        raise ValueError(f"variance_type must be one of {', '.join(VARIANCE_TYPES)}; got {kind!r}")

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None,
             return_dict: bool = True) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """x_{t'} from x_t (``sample``) and the model's output at ``timestep``.

        Noise is drawn from ``generator`` (as diffusers draws it) whenever timestep > 0.
        Returns ``SchedulerOutput(prev_sample, pred_original_sample)``, or that pair as a tuple.
        """
        t = int(timestep)
        if not 0 <= t < self.config.num_train_timesteps:
            raise ValueError(f"timestep {t} is outside [0, {self.config.num_train_timesteps})")
        prev_t = self.previous_timestep(t)
        predicted_variance = None
        if (self.variance_type in ("learned", "learned_range") and isinstance(model_output, torch.Tensor)
                and isinstance(sample, torch.Tensor) and model_output.dim() > 1 and sample.dim() > 1
                and model_output.shape[1] == 2 * sample.shape[1]):
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)

        # 1. alpha-bar_t and alpha-bar_{t'} (1 before the first timestep)
        alpha_prod_t = self._alpha_bar(t, 1.0)
        alpha_prod_t_prev = self._alpha_bar(prev_t, float(self.one))
        check_alpha_bar(alpha_prod_t, t, self.config.prediction_type)

        # 2. x0 from the model output, clipped; posterior-mean coefficients (eq. 7)
        clip = self.config.clip_sample_range if self.config.clip_sample and not self.config.thresholding else None
        coeffs = sc.ddpm(alpha_prod_t, alpha_prod_t_prev, prediction_type=self.config.prediction_type,
                         clip_sample_range=clip)
        x, m = step_inputs(sample, model_output, batch_strided=True)  # the mean half stays a view

        # 3. noise sigma_t * z for t > 0, drawn in the model output's shape and dtype
        noise = variance = None
        if t > 0:
            z = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype)
            if self.variance_type == "learned_range" and predicted_variance is not None:
                # sigma_t = exp(v_a + v_b*v) per element, in the fused op (N&D 2021, eq. 15)
                v_a, v_b = sc.ddpm_learned_range(alpha_prod_t, alpha_prod_t_prev)
                coeffs = coeffs._replace(c_n=1.0, v_a=v_a, v_b=v_b)
                variance = like(predicted_variance, x, batch_strided=True)
            else:
                scale = self._noise_scale(alpha_prod_t, alpha_prod_t_prev, predicted_variance)
                if isinstance(scale, torch.Tensor):  # learned: fold the per-element scale into the noise
                    z, scale = scale * z, 1.0
                coeffs = coeffs._replace(c_n=scale)
            noise = like(z, x)

        # 4. x_{t'} = c_x0 * x0 + c_x * x_t + sigma_t * z in one fused op, x0 clipped or thresholded
        threshold = None
        if self.config.thresholding:
            threshold = DynamicThreshold(self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        prev, x0 = fused_update(x, m, coeffs, noise=noise, variance=variance, threshold=threshold)
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)
