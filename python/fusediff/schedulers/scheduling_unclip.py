"""UnCLIPScheduler: the DDPM variant of unCLIP (DALL-E 2 / Karlo), which re-derives beta over a strided step.

Each step goes from x_t to x_{t'}, t' = ``prev_timestep`` (t - 1 when not given), by sampling
the posterior q(x_{t'} | x_t, x0) with x0 predicted by the model (Ho et al. 2020, eq. 6, 7):

    beta   = betas[t], alpha = alphas[t]                          if t' = t - 1 (the table's values)
    beta   = 1 - abar_t / abar_t',  alpha = 1 - beta              otherwise (the whole stride)
    x0     = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), or the model output ("sample"); clipped
    x_{t'} = sqrt(abar_t') beta / (1 - abar_t) x0 + sqrt(alpha) (1 - abar_t') / (1 - abar_t) x_t + sigma z
    sigma  = sqrt(beta-tilde), beta-tilde = (1 - abar_t') / (1 - abar_t) beta       fixed_small_log
    sigma  = exp(0.5 (f log beta + (1 - f) log beta-tilde)), f = (v + 1) / 2        learned_range (N&D 2021, eq. 15)

with abar from the cosine schedule (squaredcos_cap_v2, Nichol & Dhariwal 2021, sec. 3.2) and v the
second half of the model output's channels. The run's timesteps are Karlo's: n values
round(i (T - 1) / (n - 1)), i = n - 1 .. 0, so the first is T - 1 and the last 0. The update is one
fused op (:func:`fusediff.kernels.scheduler_step`); learned_range scales the noise per element first,
as :class:`~fusediff.schedulers.DDPMScheduler` does.

Same config keys, defaults, timesteps and random draws as diffusers 0.42.1's ``UnCLIPScheduler``
(DESIGN.md, decisions 4 and 5); the step's scalars are computed as diffusers computes them, in float32
(see ``UnCLIPScheduler._scalars``: at the first strided step float32 drops the x_t term, and the cosine
schedule's 1/sqrt(alpha-bar) ~ 2e4 makes any other choice visible in the images), then handed to the
fused op. Differences, where diffusers fails late or obscurely: an
unknown ``variance_type`` or ``prediction_type`` raises at construction (diffusers: at the first step
with t > 0), ``set_timesteps`` needs at least 2 steps (diffusers divides by zero at 1), a timestep
outside the schedule raises ValueError, and learned_range clamps beta-tilde at 1e-20 before its log
(diffusers takes log(0) = -inf, NaN when f = 1). Like diffusers it reads no config of other schedulers.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..configuration import register_to_config
from ..kernels.scheduler_step_coeffs import StepCoeffs
from ..utils.torch_utils import randn_tensor
from .alpha_bar_scheduler import AlphaBarScheduler
from .beta_schedules import betas_for_alpha_bar
from .fused_step import fused_update, like, step_inputs
from .registry import compatibles_of
from .scheduling_base import SchedulerOutput

VARIANCE_TYPES = ("fixed_small_log", "learned_range")
PREDICTION_TYPES = ("epsilon", "sample")

UnCLIPSchedulerOutput = SchedulerOutput  # the name diffusers gives this scheduler's output


class StepScalars(NamedTuple):
    """The scalars of one step t -> t' (float32 values, as diffusers computes them)."""

    abar_t: float  # alpha-bar_t
    sqrt_abar_t: float  # sqrt(alpha-bar_t)
    sqrt_one_minus_abar_t: float  # sqrt(1 - alpha-bar_t)
    c_x0: float  # posterior mean <- x0: sqrt(abar_t') beta / (1 - abar_t)
    c_x: float  # posterior mean <- x_t: sqrt(alpha) (1 - abar_t') / (1 - abar_t)
    sigma: float  # fixed_small_log noise scale sqrt(beta-tilde)
    min_log: float  # learned_range: log beta-tilde (clamped at 1e-20)
    max_log: float  # learned_range: log beta


class UnCLIPScheduler(AlphaBarScheduler):
    """The modified DDPM sampler of unCLIP's prior, decoder and super-resolution stages.

    Args:
        num_train_timesteps: number T of diffusion steps the model was trained with.
        variance_type: fixed_small_log (posterior variance) or learned_range (the model interpolates
            log beta-tilde and log beta with the second half of its output channels).
        clip_sample: clamp x0 to [-clip_sample_range, clip_sample_range].
        clip_sample_range: the clip bound.
        prediction_type: what the model predicts: epsilon or sample (x0).
        beta_schedule: only squaredcos_cap_v2 (the cosine schedule).
    """

    _compatibles = compatibles_of("UnCLIPScheduler")

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, variance_type: str = "fixed_small_log",
                 clip_sample: bool = True, clip_sample_range: float = 1.0, prediction_type: str = "epsilon",
                 beta_schedule: str = "squaredcos_cap_v2") -> None:
        if beta_schedule != "squaredcos_cap_v2":
            raise ValueError(f"UnCLIPScheduler supports beta_schedule 'squaredcos_cap_v2' only; got {beta_schedule!r}")
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {', '.join(VARIANCE_TYPES)}; got {variance_type!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {prediction_type!r}")
        self._init_tables(betas_for_alpha_bar(num_train_timesteps))
        self.one = torch.tensor(1.0)  # alpha-bar before the first timestep
        self.variance_type = variance_type
        self.num_inference_steps: int | None = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy())
        self._scalar_cache: tuple[tuple, dict[tuple[int, int], StepScalars]] = ((), {})

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Karlo's timesteps: round(i (T - 1) / (n - 1)) for i = n - 1 .. 0 (from T - 1 down to 0)."""
        T = self.config.num_train_timesteps
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
            raise ValueError(f"UnCLIPScheduler needs num_inference_steps >= 2 (its step ratio is (T - 1) / (n - 1)); "
                             f"got {n}")
        n = int(n)
        self.num_inference_steps = n
        ratio = (T - 1) / (n - 1)
        timesteps = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64)
        self._set_run_timesteps(torch.from_numpy(timesteps), device)

    def _check_timestep(self, t: int, what: str) -> None:
        if not 0 <= t < self.config.num_train_timesteps:
            raise ValueError(f"{what} {t} is outside [0, {self.config.num_train_timesteps})")

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             prev_timestep: int | torch.Tensor | None = None,
             generator: torch.Generator | list[torch.Generator] | None = None,
             return_dict: bool = True) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """x_{t'} from x_t (``sample``) and the model's output at ``timestep``; t' = ``prev_timestep``
        (t - 1 when None; -1 means past the first timestep, alpha-bar = 1).

        Noise is drawn from ``generator`` (as diffusers draws it) whenever timestep > 0. Returns
        ``SchedulerOutput(prev_sample, pred_original_sample)``, or that pair as a tuple.
        """
        t = int(timestep)
        self._check_timestep(t, "timestep")
        prev_t = t - 1 if prev_timestep is None else int(prev_timestep)
        if prev_t >= 0:
            self._check_timestep(prev_t, "prev_timestep")
        predicted_variance = None
        if (self.variance_type == "learned_range" and isinstance(model_output, torch.Tensor)
                and isinstance(sample, torch.Tensor) and model_output.dim() > 1 and sample.dim() > 1
                and model_output.shape[1] == 2 * sample.shape[1]):
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)

        # 1.-2. the step's scalars, computed as diffusers computes them (float32, see _scalars)
        sc = self._scalars(t, prev_t)
        if sc.abar_t <= 0 or sc.abar_t >= 1:
            raise ValueError(f"alpha-bar at timestep {t} is {sc.abar_t}: the step needs 0 < alpha-bar_t < 1")
        # x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (eps), or the model output (sample); clipped
        if self.config.prediction_type == "epsilon":
            p_x, p_m = 1 / sc.sqrt_abar_t, -sc.sqrt_one_minus_abar_t / sc.sqrt_abar_t
        else:
            p_x, p_m = 0.0, 1.0
        clip = float(self.config.clip_sample_range) if self.config.clip_sample else 0.0
        coeffs = StepCoeffs(p_x=p_x, p_m=p_m, c_x=sc.c_x, c_x0=sc.c_x0, clip=clip)
        x, m = step_inputs(sample, model_output)

        # 3. noise sigma z for t > 0, drawn in the model output's shape and dtype
        noise = None
        if t > 0:
            z = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype)
            scale = self._noise_scale(sc, predicted_variance)
            if isinstance(scale, torch.Tensor):  # per element: fold the scale into the noise
                z, scale = scale * z, 1.0
            noise, coeffs = like(z, x), coeffs._replace(c_n=scale)

        # 4. x_{t'} = c_x0 * x0 + c_x * x_t + sigma * z in one fused op
        prev, x0 = fused_update(x, m, coeffs, noise=noise)
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _scalars(self, t: int, prev_t: int) -> StepScalars:
        """The scalars of the step t -> t' exactly as diffusers' ``step`` and ``_get_variance`` compute them:
        float32 0-dim tensors from the float32 tables, the same operations in the same order.

        Float32 matters at the first step of a strided run: beta = 1 - abar_999/abar_t' rounds to 1, so
        alpha = 1 - beta is 0 and the x_t term drops out (float64: alpha ~ 5e-9, c_x ~ 4e-5), and
        1 - abar_999 rounds to 1. The model output's x0 term is multiplied by 1/sqrt(abar_999) ~ 2e4, so
        computing these in float64 instead moved tiny-model unCLIP images by up to 0.08 in float64 runs
        (tests/pipelines/test_unclip.py). Cached per (t, t').
        """
        tables = (self.alphas_cumprod, self.betas, self.alphas, self.one)
        if len(self._scalar_cache[0]) != len(tables) or any(a is not b for a, b in zip(self._scalar_cache[0], tables)):
            self._scalar_cache = (tables, {})  # rebuilt when a table is replaced (add_noise moves it)
        cached = self._scalar_cache[1].get((t, prev_t))
        if cached is not None:
            return cached
        abar, betas, alphas, one = (v.detach().cpu() for v in tables)
        alpha_prod_t = abar[t]
        alpha_prod_t_prev = abar[prev_t] if prev_t >= 0 else one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        if prev_t == t - 1:  # the table's values on the full chain
            beta, alpha = betas[t], alphas[t]
        else:  # beta re-derived over the stride
            beta = 1 - alpha_prod_t / alpha_prod_t_prev
            alpha = 1 - beta
        c_x0 = (alpha_prod_t_prev ** (0.5) * beta) / beta_prod_t  # Ho et al. 2020, eq. 7
        c_x = alpha ** (0.5) * beta_prod_t_prev / beta_prod_t
        variance = beta_prod_t_prev / beta_prod_t * beta  # beta-tilde over the step
        sigma = torch.exp(0.5 * torch.log(torch.clamp(variance, min=1e-20)))  # fixed_small_log
        min_log, max_log = torch.log(torch.clamp(variance, min=1e-20)), beta.log()  # learned_range
        values = StepScalars(*(float(v) for v in (alpha_prod_t, alpha_prod_t ** (0.5), beta_prod_t ** (0.5),
                                                   c_x0, c_x, sigma, min_log, max_log)))
        self._scalar_cache[1][(t, prev_t)] = values
        return values

    def _noise_scale(self, sc: StepScalars, predicted_variance: torch.Tensor | None) -> float | torch.Tensor:
        """sigma: a float for fixed_small_log, a tensor (per element) for learned_range."""
        if self.variance_type == "fixed_small_log":
            return sc.sigma
        if predicted_variance is None:
            raise ValueError("variance_type 'learned_range' reads the variance from the model output, which must "
                             "have twice the sample's channels (prediction, then variance)")
        frac = (predicted_variance + 1) / 2
        return torch.exp(0.5 * (frac * sc.max_log + (1 - frac) * sc.min_log))
