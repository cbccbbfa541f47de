"""DDIM: denoising diffusion implicit models (Song et al. 2021).

A strided run over the DDPM noise schedule. From x_t to x_{t'}, t' = t - T // num_inference_steps:

    x0      = the model's x0 prediction, clipped or dynamically thresholded
    sigma_t = eta * sqrt((1 - abar_t') / (1 - abar_t)) * sqrt(1 - abar_t / abar_t')       (eq. 16)
    x_{t'}  = sqrt(abar_t') x0 + sqrt(1 - abar_t' - sigma_t^2) eps + sigma_t z           (eq. 12)

eta = 0 is the deterministic DDIM sampler, eta = 1 a DDPM-like ancestral one. With
``use_clipped_model_output`` eps is re-derived from the clipped x0, as in GLIDE. Zero-terminal-SNR
betas (Lin et al. 2024) and the trailing spacing of their table 2 are supported. The update is one
fused op (:func:`fusediff.kernels.scheduler_step`), dynamic thresholding of x0 included (the op's
``threshold`` argument: diffusers' ``_threshold_sample`` exactly, x0 rounded to the model's dtype and
the quantile taken in float32; there is no ``_threshold_sample`` method).

Same config keys, defaults, timesteps and random draws as diffusers' ``DDIMScheduler`` (DESIGN.md,
decisions 4 and 5); like it, t' is t - T // n whatever the spacing. Differences: a timestep outside
[0, num_train_timesteps) raises ValueError (diffusers wraps negative ones around), and an epsilon
prediction at alpha-bar_t = 0 raises (diffusers returns inf/NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

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

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

DDIMSchedulerOutput = SchedulerOutput  # the name diffusers gives this scheduler's output


class DDIMScheduler(AlphaBarScheduler):
    """Denoising diffusion implicit model sampler (Song et al. 2021, eq. 12).

    Args:
        num_train_timesteps: number T of diffusion steps the model was trained with.
        beta_start, beta_end: first and last beta of the linear-type schedules.
        beta_schedule: linear, scaled_linear or squaredcos_cap_v2 (cosine).
        trained_betas: explicit betas; overrides the three arguments above.
        clip_sample: clamp x0 to [-clip_sample_range, clip_sample_range].
        set_alpha_to_one: alpha-bar after the last step is 1 (else alpha-bar_0).
        steps_offset: added to the leading-spaced timesteps.
        prediction_type: what the model predicts: epsilon, sample (x0) or v_prediction.
        thresholding: dynamic thresholding of x0 (replaces clip_sample), with
            ``dynamic_thresholding_ratio`` (the quantile) and ``sample_max_value`` (its cap).
        clip_sample_range: the clip bound.
        timestep_spacing: leading, trailing or linspace (Lin et al. 2024, table 2).
        rescale_betas_zero_snr: rescale betas to zero terminal SNR (Lin et al. 2024, alg. 1).
    """

    _compatibles = compatibles_of("DDIMScheduler")

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Sequence[float] | np.ndarray | None = None,
                 clip_sample: bool = True, set_alpha_to_one: bool = True, steps_offset: int = 0,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False):
        betas = make_betas(type(self).__name__, beta_schedule, num_train_timesteps, beta_start, beta_end,
                           trained_betas, BETA_SCHEDULES)
        self._init_tables(betas, rescale_betas_zero_snr)
        # alpha-bar after the last step: 1 (a clean sample), or alpha-bar_0
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.num_inference_steps: int | None = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose ``num_inference_steps`` timesteps spaced by ``timestep_spacing`` (descending)."""
        T = self.config.num_train_timesteps
        n = check_num_inference_steps(num_inference_steps, T)
        timesteps = spaced_timesteps(T, n, self.config.timestep_spacing, self.config.steps_offset)
        self.num_inference_steps = n
        self._set_run_timesteps(torch.from_numpy(timesteps), device)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             eta: float = 0.0, use_clipped_model_output: bool = False,
             generator: torch.Generator | list[torch.Generator] | None = None,
             variance_noise: torch.Tensor | None = None,
             return_dict: bool = True) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """x_{t'} from x_t (``sample``) and the model's output at ``timestep``.

        Args:
            eta: weight of the added noise (0: deterministic DDIM, 1: DDPM-like).
            use_clipped_model_output: derive eps from the clipped (or thresholded) x0.
            generator: draws the noise when eta > 0, as diffusers draws it.
            variance_noise: the noise itself instead of a generator (e.g. CycleDiffusion).
            return_dict: return a ``SchedulerOutput`` rather than ``(prev_sample, pred_original_sample)``.
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step(): DDIM strides by "
                             "num_train_timesteps // num_inference_steps")
        T = self.config.num_train_timesteps
        t = int(timestep)
        if not 0 <= t < T:
            raise ValueError(f"timestep {t} is outside [0, {T})")
        prev_t = t - T // self.num_inference_steps

        # 1. alpha-bar_t and alpha-bar_{t'} (final_alpha_cumprod after the last step)
        alpha_prod_t = self._alpha_bar(t, 1.0)
        alpha_prod_t_prev = self._alpha_bar(prev_t, float(self.final_alpha_cumprod))
        check_alpha_bar(alpha_prod_t, t, self.config.prediction_type)

        # 2. x0 and eps from the model output, x0 clipped; sigma_t(eta); eq. 12 as coefficients
        clip = self.config.clip_sample_range if self.config.clip_sample and not self.config.thresholding else None
        coeffs = sc.ddim(alpha_prod_t, alpha_prod_t_prev, eta=eta, prediction_type=self.config.prediction_type,
                         clip_sample_range=clip, use_clipped_model_output=use_clipped_model_output)
        x, m = step_inputs(sample, model_output)

        # 3. noise sigma_t * z, only when eta > 0: given, or drawn in the model output's shape and dtype
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("step takes a generator or variance_noise, not both")
            if variance_noise is None:
                variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                              dtype=model_output.dtype)
            noise = like(variance_noise, x)

        # 4. x_{t'} = sqrt(abar_t') x0 + direction + sigma_t z in one fused op, x0 clipped or thresholded
        threshold = None
        if self.config.thresholding:
            threshold = DynamicThreshold(self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        prev, x0 = fused_update(x, m, coeffs, noise=noise, threshold=threshold)
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)
