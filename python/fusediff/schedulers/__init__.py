"""Noise schedulers: turn a model's output at timestep t into the next sample of a run.

DDPM (Ho et al. 2020), DDIM (Song et al. 2021) and PNDM (Liu et al. 2022) over one discrete
noise schedule, each ``step`` a single fused op (:func:`fusediff.kernels.scheduler_step`).
Configs, timesteps and seeded noise are those of diffusers' schedulers of the same names.
"""

from .scheduling_ddim import DDIMScheduler
from .scheduling_ddpm import DDPMScheduler
from .scheduling_pndm import PNDMScheduler
from .scheduling_utils import SchedulerMixin, SchedulerOutput

__all__ = ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "SchedulerMixin", "SchedulerOutput"]
