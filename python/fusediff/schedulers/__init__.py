"""Noise schedulers: turn a model's output at timestep t into the next sample of a run.

DDPM (Ho et al. 2020), DDIM (Song et al. 2021), PNDM (Liu et al. 2022), Euler, Euler ancestral
and Heun (Karras et al. 2022), LMS, DPM-Solver++ (Lu et al. 2022), DEIS (Zhang & Chen 2023) and
UniPC (Zhao et al. 2023) over one discrete noise schedule, each ``step`` one fused op
(:func:`fusediff.kernels.scheduler_step`), two where dynamic thresholding or a derivative needs it.
Configs, timesteps and seeded noise are those of diffusers' schedulers of the same names.
"""

from ..utils.lazy import lazy_exports
from .registry import exports

# exported on first use (utils/lazy.py): name -> submodule, from the registry
_LAZY = exports()
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

__all__ = list(_LAZY)
