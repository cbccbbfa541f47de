"""Noise schedulers: turn a model's output at timestep t into the next sample of a run.

DDPM (Ho et al. 2020), DDIM (Song et al. 2021), PNDM (Liu et al. 2022), Euler, Euler ancestral
and Heun (Karras et al. 2022), LMS, DPM-Solver++ (Lu et al. 2022), DEIS (Zhang & Chen 2023) and
UniPC (Zhao et al. 2023) over one discrete noise schedule, each ``step`` one fused op
(:func:`fusediff.kernels.scheduler_step`), two where dynamic thresholding or a derivative needs it.
Configs, timesteps and seeded noise are those of diffusers' schedulers of the same names.
"""

from .scheduling_ddim import DDIMScheduler
from .scheduling_ddpm import DDPMScheduler
from .scheduling_pndm import PNDMScheduler
from .scheduling_utils import SchedulerMixin, SchedulerOutput
from ..utils.lazy import lazy_exports

# exported on first use (utils/lazy.py): name -> submodule
_LAZY = {
    "EulerDiscreteScheduler": "scheduling_euler_discrete",
    "EulerAncestralDiscreteScheduler": "scheduling_euler_ancestral_discrete",
    "HeunDiscreteScheduler": "scheduling_heun_discrete",
    "LMSDiscreteScheduler": "scheduling_lms_discrete",
    "DPMSolverMultistepScheduler": "scheduling_dpmsolver_multistep",
    "DEISMultistepScheduler": "scheduling_deis_multistep",
    "UniPCMultistepScheduler": "scheduling_unipc_multistep",
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

__all__ = ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "SchedulerMixin", "SchedulerOutput", *_LAZY]
