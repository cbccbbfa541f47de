"""Schedule: the discrete noise schedule of training, as an nn.Module whose tables move with ``.to``.

The forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) over t = 0 .. T-1, with
abar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, eq. 4). The tables are float32 buffers, as the
schedulers hold them, and are read in the data's dtype exactly as the schedulers' ``add_noise`` and
``get_velocity`` read them, so a Schedule built from a scheduler noises a batch to the same numbers.

A Schedule remembers the config of the scheduler it came from (``from_scheduler``), so that
``to_scheduler`` builds a sampling scheduler of any fusediff class over the same betas.

Limits: discrete variance-preserving schedules only (no continuous-time or EDM sigma schedules). The
buffers are not persistent: they are rebuilt from the betas, and a module holding a Schedule
(the Sampler) saves only its model's weights in its ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .losses import compute_snr


class Schedule(nn.Module):
    """The betas and alpha-bar table of a discrete diffusion schedule.

    Args:
        betas: (T,) beta_t for t = 0 .. T-1 (held in float32).
        alphas_cumprod: (T,) alpha-bar_t when it is not the cumulative product of 1 - betas (the sigma-based
            schedulers lift a zero terminal alpha-bar to 2^-24); default cumprod(1 - betas).
        scheduler_config: the config of the scheduler the betas came from, used by :meth:`to_scheduler`.
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor

    def __init__(self, betas: torch.Tensor | Sequence[float], alphas_cumprod: torch.Tensor | None = None,
                 scheduler_config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float32).detach().cpu()
        if betas.dim() != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence; got shape {tuple(betas.shape)}")
        if not bool(((betas >= 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in [0, 1]")
        if alphas_cumprod is None:
            alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float32).detach().cpu()
        if alphas_cumprod.shape != betas.shape:
            raise ValueError(f"alphas_cumprod must have the betas' shape {tuple(betas.shape)}; "
                             f"got {tuple(alphas_cumprod.shape)}")
        self.register_buffer("betas", betas.clone(), persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone(), persistent=False)
        self.scheduler_config = dict(scheduler_config) if scheduler_config is not None else None

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> Schedule:
        """The schedule of a scheduler with ``betas`` and ``alphas_cumprod`` (fusediff's or diffusers':
        DDPM, DDIM, PNDM, the Euler/Heun/LMS and the multistep ones)."""
        betas = getattr(scheduler, "betas", None)
        table = getattr(scheduler, "alphas_cumprod", None)
        if not isinstance(betas, torch.Tensor) or not isinstance(table, torch.Tensor):
            raise TypeError(f"from_scheduler needs a scheduler with betas and alphas_cumprod tensors; "
                            f"{type(scheduler).__name__} has none")
        config = getattr(scheduler, "config", None)
        # the whole config, "_use_default_values" included: from_config then leaves another class's defaults
        # (e.g. its timestep_spacing) where the source scheduler had its own defaults, as diffusers does
        return cls(betas, table, dict(config) if config is not None else None)

    @property
    def num_timesteps(self) -> int:
        """T, the number of training timesteps."""
        return self.betas.shape[0]

    def extra_repr(self) -> str:
        return f"num_timesteps={self.num_timesteps}"

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)), the signal and noise scales of x_t.

        With ``like`` (B, ...): in its dtype and device, shaped (B, 1, ..., 1) to broadcast over it;
        without: float32, shaped like ``t``.
        """
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"t must be an integer tensor of timesteps; got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if like is None:
            abar = self.alphas_cumprod.to(t.device)[t]
            return abar**0.5, (1 - abar) ** 0.5
        abar = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)[t.to(like.device)].flatten()
        if abar.shape[0] not in (1, like.shape[0]):
            raise ValueError(f"t must hold one timestep or one per item ({like.shape[0]}); got shape {tuple(t.shape)}")
        shape = (abar.shape[0],) + (1,) * (like.dim() - 1)  # (B, 1, ..., 1)
        return (abar**0.5).reshape(shape), ((1 - abar) ** 0.5).reshape(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (Ho et al. 2020, eq. 4)."""
        a, s = self.alpha_sigma(t, like=x0)
        return a * x0 + s * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v_t = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (Salimans & Ho 2022, sec. 4)."""
        a, s = self.alpha_sigma(t, like=x0)
        return a * noise - s * x0

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = abar_t / (1 - abar_t), float32, shaped like ``t`` (:func:`~fusediff.training.compute_snr`)."""
        return compute_snr(self.alphas_cumprod, t)

    def to_scheduler(self, cls: type | None = None, **overrides: Any) -> Any:
        """A fusediff scheduler of class ``cls`` (default DDIMScheduler) over these betas.

        Built from the source scheduler's config when there is one (so spacing, clipping and zero-SNR
        rescaling carry over), else from ``trained_betas``; ``overrides`` replace config values
        (e.g. ``prediction_type``).
        """
        if cls is None:
            from ..schedulers import DDIMScheduler

            cls = DDIMScheduler
        if not isinstance(cls, type) or not hasattr(cls, "from_config"):
            raise TypeError(f"cls must be a scheduler class; got {cls!r}")
        if self.scheduler_config is not None:
            scheduler = cls.from_config(self.scheduler_config, **overrides)
        else:
            config = {"num_train_timesteps": self.num_timesteps, "trained_betas": self.betas.cpu().tolist()}
            scheduler = cls.from_config(config, **overrides)
        ours = self.alphas_cumprod.detach().cpu()
        theirs = scheduler.alphas_cumprod.detach().cpu().float()
        if theirs.shape != ours.shape or not torch.allclose(theirs[:-1], ours[:-1], rtol=1e-5, atol=1e-7):
            raise ValueError(f"{cls.__name__} built from this schedule's config has another alpha-bar table; "
                             "build the Schedule from the scheduler you sample with")
        return scheduler
