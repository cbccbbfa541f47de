"""What the discrete-time schedulers share: loading and saving, the output type, beta schedules,
timestep spacings, dynamic thresholding, and the plumbing into the fused scheduler step.

A scheduler's configuration is its constructor (DESIGN.md, decision 7) and is saved as
``scheduler_config.json`` with diffusers' keys, so either library loads the other's file
(decision 4). DDPM, DDIM and PNDM share one noise schedule: a table of betas over
``num_train_timesteps`` steps and its cumulative product alpha-bar_t (Ho et al. 2020, eq. 4),
held in float32 as diffusers holds it, so that coefficients read from it are the same numbers.

Every ``step`` ends in one call of :func:`fusediff.kernels.scheduler_step` with coefficients
from :mod:`fusediff.kernels.scheduler_step_coeffs`. Rules that are not coefficients are pre- or
post-processed here in PyTorch around that call: per-element noise scales are folded into the
noise, and dynamic thresholding runs between a first call that yields x0 and the update
(:func:`fused_update`).

Limits: the coefficients are computed in float64 from the float32 table, where diffusers
computes them in float32, so results agree to float32 rounding of the coefficients (more where
diffusers' own float32 arithmetic cancels, e.g. 1 - alpha-bar_t/alpha-bar_{t-1} at t = 1).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from ..configuration import ConfigMixin
from ..kernels import scheduler_step
from ..kernels.scheduler_step_coeffs import StepCoeffs
from ..utils.outputs import BaseOutput
from ..utils.torch_utils import to_device

SCHEDULER_CONFIG_NAME = "scheduler_config.json"
# Schedulers over the same discrete alpha-bar table; each reads the others' configs (diffusers'
# KarrasDiffusionSchedulers, less the ones fusediff does not have).
DISCRETE_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                       "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                       "DPMSolverMultistepScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler")
# Last alpha-bar of zero-terminal-SNR betas in the sigma-based schedulers: near 0, so sigma stays finite
# (the value diffusers' Euler, DPM-Solver and UniPC schedulers use).
ZERO_SNR_ALPHA_BAR = 2.0**-24
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")

S = TypeVar("S", bound="SchedulerMixin")


def compatibles_of(name: str) -> tuple[str, ...]:
    """The scheduler class names whose configs ``name`` reads as its own: the other discrete ones."""
    return tuple(n for n in DISCRETE_SCHEDULERS if n != name)


@dataclasses.dataclass
class SchedulerOutput(BaseOutput):
    """What ``step`` returns.

    Attributes:
        prev_sample: x_{t-1} (or the next sample of the run), the model's next input.
        pred_original_sample: the clipped or thresholded x0 predicted at this step; None for
            schedulers that do not form it (PNDM).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class SchedulerMixin(ConfigMixin):
    """Base of all schedulers: configuration, ``from_pretrained`` and ``save_pretrained``."""

    config_name = SCHEDULER_CONFIG_NAME
    has_compatibles = True

    @classmethod
    def from_pretrained(cls: type[S], pretrained_model_name_or_path: str | os.PathLike,
                        subfolder: str | None = None, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        token: str | bool | None = None, **overrides: Any) -> S:
        """Build the scheduler from ``scheduler_config.json`` in a directory or Hub repo.

        The file may come from any compatible scheduler of either library; ``overrides`` replace
        config values (``DDIMScheduler.from_pretrained(repo, subfolder="scheduler",
        timestep_spacing="trailing")``).
        """
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, revision=revision,
                                 cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        return cls.from_config(config, **overrides)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``scheduler_config.json`` into ``save_directory``, atomically."""
        self.save_config(save_directory)

    @property
    def host_timesteps(self) -> torch.Tensor:
        """The run's ``timesteps`` on the CPU, for stepping without reading the device: a copy kept
        when they were set (made anew, with a device read, only if ``timesteps`` was replaced)."""
        cached = self.__dict__.get("_host_timesteps")
        if cached is None or cached[0] is not self.timesteps:
            cached = self._host_timesteps = (self.timesteps, self.timesteps.detach().cpu())
        return cached[1]

    def _set_run_timesteps(self, timesteps: torch.Tensor, device: str | torch.device | None = None) -> None:
        """Install the run's ``timesteps`` (a CPU tensor) on ``device``, keeping the CPU copy
        (:attr:`host_timesteps`) so that a sampling loop never reads them back from the device."""
        self.timesteps = timesteps.to(device)
        self._host_timesteps = (self.timesteps, timesteps)

    @property
    def compatibles(self) -> list[type]:
        """This class and the fusediff scheduler classes that can be built from its config."""
        import fusediff

        found = [getattr(fusediff, name, None) for name in (type(self).__name__, *self._compatibles)]
        return [c for c in found if isinstance(c, type)]


class StepIndexMixin:
    """Where a run stands, for schedulers that step through a table of noise levels (the sigma-based
    and multistep ones): the index of the next step, and the index a pipeline starts at (img2img).

    ``_begin_index_limit`` is the largest index ``set_begin_index`` accepts (None: no upper bound).
    """

    timesteps: torch.Tensor
    _step_index: int | None
    _begin_index: int | None

    @property
    def step_index(self) -> int | None:
        """Index into ``timesteps`` of the next step; None until the first step of a run."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Index the run starts at, when a pipeline set one with ``set_begin_index``; else None."""
        return self._begin_index

    def _begin_index_limit(self) -> int | None:
        return len(self.timesteps) - 1

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the run at ``timesteps[begin_index]`` (img2img); call after ``set_timesteps``."""
        limit = self._begin_index_limit()
        if (isinstance(begin_index, bool) or int(begin_index) != begin_index or begin_index < 0
                or (limit is not None and begin_index > limit)):
            where = "a non-negative integer" if limit is None else f"an integer in [0, {limit}]"
            raise ValueError(f"begin_index must be {where}; got {begin_index!r}")
        self._begin_index = int(begin_index)

    def _noise_indices(self, timesteps: torch.Tensor, device: torch.device) -> list[int]:
        """add_noise's index into the run's noise levels per timestep: the run's begin index (img2img,
        before the first step) or current index (inpainting, after it) when a pipeline set one, else
        each timestep's position in the schedule (training)."""
        if self._begin_index is None:
            schedule = self.timesteps.to(device)
            return [self.index_for_timestep(t, schedule) for t in timesteps.to(device)]
        index = self._begin_index if self._step_index is None else self._step_index
        return [index] * len(timesteps)

    def index_for_timestep(self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Position of ``timestep`` in the schedule; the second where it occurs twice (Heun's doubled
        table, or a run entered mid-schedule), so that no noise level is skipped. Raises ValueError
        if it is not there."""
        schedule = self.host_timesteps if schedule_timesteps is None else schedule_timesteps
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(schedule.device)  # a device read when a device timestep meets the host table
        hits = (schedule == timestep).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep {float(timestep)} is not in the schedule ({len(schedule)} timesteps from "
                             f"{float(schedule[0])} to {float(schedule[-1])}); pass one of scheduler.timesteps")
        return int(hits[1 if len(hits) > 1 else 0])


# -- beta schedules ----------------------------------------------------------------------------
def alpha_bar_cosine(t: float) -> float:
    """Cosine alpha-bar(t), t in [0, 1], offset s = 0.008 (Nichol & Dhariwal 2021, eq. 17)."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def alpha_bar_laplace(t: float) -> float:
    """sqrt(sigmoid(lambda(t))) for the Laplace log-SNR lambda(t) = -0.5 sgn(0.5 - t) ln(1 - 2|t - 0.5|)
    (Hang et al. 2024, mu = 0, b = 0.5), in the form diffusers' "laplace" schedule uses."""
    log_snr = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
    snr = math.exp(log_snr)
    return math.sqrt(snr / (1 + snr))


def alpha_bar_exp(t: float) -> float:
    """Exponential alpha-bar(t) = exp(-12 t)."""
    return math.exp(-12.0 * t)


ALPHA_BAR_FNS: dict[str, Callable[[float], float]] = {
    "cosine": alpha_bar_cosine, "laplace": alpha_bar_laplace, "exp": alpha_bar_exp}


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999,
                        alpha_transform_type: str = "cosine") -> torch.Tensor:
    """Betas that step a continuous alpha-bar(t) in ``num_diffusion_timesteps`` equal steps (float32).

    beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta) (Nichol & Dhariwal 2021, sec. 3.2).
    """
    try:
        alpha_bar = ALPHA_BAR_FNS[alpha_transform_type]
    except KeyError:
        raise ValueError(f"alpha_transform_type must be one of {', '.join(ALPHA_BAR_FNS)}; "
                         f"got {alpha_transform_type!r}") from None
    n = num_diffusion_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last alpha-bar is exactly 0, i.e. zero terminal SNR (Lin et al. 2024, alg. 1)."""
    # 1. sqrt(alpha-bar_t) of the given schedule
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    # 2. shift so that the last value is 0, scale so that the first one is unchanged
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    # 3. back to betas: alpha_t = alpha-bar_t / alpha-bar_{t-1}
    abar = sqrt_abar**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def make_betas(owner: str, beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float,
               trained_betas: Sequence[float] | np.ndarray | None, schedules: Sequence[str]) -> torch.Tensor:
    """The float32 betas of a config; ``schedules`` names the beta_schedule values ``owner`` takes."""
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    if beta_schedule not in schedules:
        raise NotImplementedError(f"beta_schedule {beta_schedule!r} is not implemented for {owner}; "
                                  f"choose one of {', '.join(schedules)}, or pass trained_betas")
    n = num_train_timesteps
    if beta_schedule == "linear":  # Ho et al. 2020, sec. 4
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # linear in sqrt(beta): latent diffusion (Rombach et al. 2022)
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(n)
    if beta_schedule in ("laplace", "exp"):
        return betas_for_alpha_bar(n, alpha_transform_type=beta_schedule)
    if beta_schedule == "sigmoid":  # GeoDiff (Xu et al. 2022)
        return torch.sigmoid(torch.linspace(-6, 6, n)) * (beta_end - beta_start) + beta_start
    raise NotImplementedError(f"beta_schedule {beta_schedule!r} has no definition")


# -- timesteps ---------------------------------------------------------------------------------
def check_num_inference_steps(num_inference_steps: Any, num_train_timesteps: int) -> int:
    """``num_inference_steps`` as an int in [1, num_train_timesteps]; raises otherwise."""
    if num_inference_steps is None:
        raise TypeError("set_timesteps needs num_inference_steps (the number of denoising steps)")
    if isinstance(num_inference_steps, bool) or int(num_inference_steps) != num_inference_steps:
        raise TypeError(f"num_inference_steps must be an integer; got {num_inference_steps!r}")
    n = int(num_inference_steps)
    if n > num_train_timesteps:
        raise ValueError(f"num_inference_steps = {n} exceeds num_train_timesteps = {num_train_timesteps}: a run "
                         "cannot have more steps than the timesteps the model was trained on")
    if n < 1:
        raise ValueError(f"num_inference_steps must be at least 1; got {n}")
    return n


def spaced_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str,
                     steps_offset: int = 0) -> np.ndarray:
    """Descending int64 timesteps of a strided run (Lin et al. 2024, table 2 names the spacings).

    linspace: round(linspace(0, T-1, n)); leading: k * (T // n) + steps_offset;
    trailing: round(T - k * T/n) - 1, which always includes t = T - 1.
    """
    T, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round() + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n))[::-1] - 1
    else:
        raise ValueError(f"timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}; got {spacing!r}")
    return ts[::-1].astype(np.int64)


# -- dynamic thresholding ----------------------------------------------------------------------
def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding of x0 (Saharia et al. 2022, sec. 2.3), per batch element.

    s = quantile(|x0|, ratio) clamped to [1, max_value]; x0 <- clamp(x0, -s, s) / s. Computed in
    float32 for half-precision inputs (quantile needs it), returned in x0's dtype.
    """
    if x0.dim() < 2:
        raise ValueError(f"dynamic thresholding needs a batch dimension; got a sample of shape {tuple(x0.shape)}")
    flat = x0.reshape(x0.shape[0], -1)  # (B, C*H*W)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)  # (B, 1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)


# -- the fused step ----------------------------------------------------------------------------
def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def step_inputs(sample: torch.Tensor, model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample`` and ``model_output`` in one dtype and one dense layout, as the fused op takes them.

    The dtype is the one PyTorch promotes the pair to, which is the dtype diffusers' step
    returns for mixed inputs (e.g. a float16 model output on a float32 sample gives float32).
    """
    for name, t in (("sample", sample), ("model_output", model_output)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"step: {name} must be a torch.Tensor; got {type(t).__name__}")
    dtype = torch.promote_types(sample.dtype, model_output.dtype)
    if sample.dtype != dtype:
        sample = sample.to(dtype)  # keeps a dense layout
    if not _dense(sample):
        sample = sample.contiguous()
    return sample, like(model_output, sample)


def like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` in ``ref``'s dtype and memory layout (a copy only where they differ).

    Tensors of another shape or device are returned as they are, for the fused op to refuse
    with a message that names them.
    """
    if not isinstance(t, torch.Tensor) or t.shape != ref.shape or t.device != ref.device:
        return t
    if t.dtype == ref.dtype and t.stride() == ref.stride():
        return t
    return torch.empty_like(ref).copy_(t)


def fused_update(sample: torch.Tensor, model_output: torch.Tensor, coeffs: StepCoeffs, *,
                 noise: torch.Tensor | None = None,
                 x0_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_prev, x0) of one update: one fused call, or two around ``x0_transform``.

    With ``x0_transform`` (dynamic thresholding), x0 is not a per-element clip of the fused
    formula, so the update runs as:
        1. x0 = p_x*x + p_m*m           (a fused call whose output is x0: c_x0 = 1)
        2. x0 <- x0_transform(x0)       (PyTorch)
        3. out = c_x*x + c_m*m + c_n*n + c_x0*x0, with x0 read from the history slot
    """
    if x0_transform is None:
        return scheduler_step(sample, model_output, coeffs, noise=noise, return_pred=True)
    if any(coeffs[7:11]) or coeffs.p_n:
        raise ValueError("an x0 transform needs an update without history or noise in x0")
    x0 = scheduler_step(sample, model_output, StepCoeffs(p_x=coeffs.p_x, p_m=coeffs.p_m, c_x0=1.0))
    x0 = like(x0_transform(x0), sample)
    update = coeffs._replace(p_x=0.0, p_m=0.0, c_x0=0.0, c_h0=coeffs.c_x0, clip=0.0)
    return scheduler_step(sample, model_output, update, noise=noise, history=(x0,)), x0


def check_alpha_bar(alpha_prod_t: float, timestep: int, prediction_type: str) -> None:
    """Refuse an epsilon prediction where alpha-bar_t = 0 (zero terminal SNR): x0 is then undefined."""
    if alpha_prod_t <= 0 and prediction_type == "epsilon":
        raise ValueError(
            f"alpha-bar is 0 at timestep {timestep} (zero terminal SNR), where x0 cannot be recovered from "
            "an epsilon prediction; use prediction_type='v_prediction' (or 'sample') with rescale_betas_zero_snr")


def alpha_bar_tables(betas: torch.Tensor, rescale_betas_zero_snr: bool = False,
                     terminal_alpha_bar: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(betas, alphas, alphas_cumprod) in float32, alpha-bar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, eq. 4).

    With ``rescale_betas_zero_snr`` the betas are rescaled to zero terminal SNR, and the last alpha-bar
    is then set to ``terminal_alpha_bar`` when given (the sigma-based schedulers need it above 0).
    """
    if betas.dim() != 1 or betas.numel() == 0:
        raise ValueError(f"betas must be a non-empty 1-D sequence; got shape {tuple(betas.shape)}")
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    if rescale_betas_zero_snr and terminal_alpha_bar is not None:
        alphas_cumprod[-1] = terminal_alpha_bar
    return betas, alphas, alphas_cumprod


# -- the alpha-bar table shared by DDPM, DDIM and PNDM -----------------------------------------
class AlphaBarScheduler(SchedulerMixin):
    """A scheduler over a discrete table alpha-bar_t, t = 0 .. num_train_timesteps - 1.

    Holds ``betas``, ``alphas`` and ``alphas_cumprod`` (float32 tensors, as diffusers), forward
    noising (``add_noise``), the v-prediction target (``get_velocity``) and the pass-through
    ``scale_model_input`` of variance-preserving schedulers (``init_noise_sigma`` = 1).
    """

    order = 1
    init_noise_sigma = 1.0

    def _init_tables(self, betas: torch.Tensor, rescale_betas_zero_snr: bool = False,
                     terminal_alpha_bar: float | None = None) -> None:
        self.betas, self.alphas, self.alphas_cumprod = alpha_bar_tables(betas, rescale_betas_zero_snr,
                                                                        terminal_alpha_bar)
        self._abar_cache: tuple[Any, list[float]] = (None, [])

    def _alpha_bar(self, t: int, final: float) -> float:
        """alpha-bar_t from the float32 table as a Python float; ``final`` for t < 0."""
        if t < 0:
            return final
        table = self.alphas_cumprod
        if table is not self._abar_cache[0]:  # rebuilt when the table is replaced (add_noise moves it)
            self._abar_cache = (table, table.detach().double().cpu().tolist())
        values = self._abar_cache[1]
        if t >= len(values):
            raise ValueError(f"timestep {t} is out of range: the schedule has {len(values)} timesteps")
        return values[t]

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """The model input at ``timestep``: the sample itself for these schedulers."""
        return sample

    def _sqrt_abar_terms(self, x: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha-bar_t) and sqrt(1 - alpha-bar_t), in x's dtype, shaped to broadcast over x."""
        timesteps = torch.as_tensor(timesteps)
        if timesteps.device.type == "cpu":  # looked up on the host: a sampling loop never waits for the device
            abar = to_device(self.alphas_cumprod.cpu()[timesteps].to(x.dtype).flatten(), x.device)
        else:
            self.alphas_cumprod = self.alphas_cumprod.to(device=x.device)  # moved once, kept there
            abar = self.alphas_cumprod.to(dtype=x.dtype)[timesteps].flatten()
        shape = abar.shape + (1,) * (x.dim() - 1)  # (B, 1, ..., 1)
        return (abar**0.5).reshape(shape), ((1 - abar) ** 0.5).reshape(shape)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (Ho et al. 2020, eq. 4)."""
        a, s = self._sqrt_abar_terms(original_samples, timesteps)
        return a * original_samples + s * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0, the v-prediction target (Salimans & Ho 2022, sec. 4)."""
        a, s = self._sqrt_abar_terms(sample, timesteps)
        return a * noise - s * sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

