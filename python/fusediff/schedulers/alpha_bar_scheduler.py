"""AlphaBarScheduler: the base of the schedulers over one discrete alpha-bar table (DDPM, DDIM and PNDM,
which step its integer timesteps; Euler, Heun and LMS through :class:`~.sigma_scheduler.SigmaScheduler`).

It holds the float32 table (:mod:`.beta_schedules`), forward noising q(x_t | x_0) and the v-prediction
target read from it, and the pass-through model input of variance-preserving schedulers. Coefficients
are read from the table as float64 Python floats, where diffusers computes them in float32.

Limits: results agree with diffusers to float32 rounding of the coefficients (more where diffusers'
own float32 arithmetic cancels, e.g. 1 - alpha-bar_t/alpha-bar_{t-1} at t = 1); an epsilon prediction
where alpha-bar_t = 0 (zero terminal SNR) is refused (:func:`check_alpha_bar`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..utils.torch_utils import to_device
from .beta_schedules import alpha_bar_tables
from .scheduling_base import SchedulerMixin


def check_alpha_bar(alpha_prod_t: float, timestep: int, prediction_type: str) -> None:
    """Refuse an epsilon prediction where alpha-bar_t = 0 (zero terminal SNR): x0 is then undefined."""
    if alpha_prod_t <= 0 and prediction_type == "epsilon":
        raise ValueError(
            f"alpha-bar is 0 at timestep {timestep} (zero terminal SNR), where x0 cannot be recovered from "
            "an epsilon prediction; use prediction_type='v_prediction' (or 'sample') with rescale_betas_zero_snr")


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
