"""Noise schedulers: turn a model's output at timestep t into the next sample of a run.

DDPM (Ho et al. 2020), DDIM (Song et al. 2021), PNDM (Liu et al. 2022), Euler, Euler ancestral
and Heun (Karras et al. 2022), LMS, DPM-Solver++ (Lu et al. 2022), DEIS (Zhang & Chen 2023) and
UniPC (Zhao et al. 2023) over one discrete noise schedule, each ``step`` one fused op
(:func:`fusediff.kernels.scheduler_step`), two where a multistep solver's dynamic thresholding or a
derivative needs it (DDPM's and DDIM's thresholding and learned-range variance are inside the one op).
Configs, timesteps and seeded noise are those of diffusers' schedulers of the same names.

Update rules vs schedulers. A sampler's update is split in two places:

- ``kernels/scheduler_step_coeffs.py`` (with ``scheduler_step_unipc.py``), public as
  ``fusediff.kernels.step_coeffs("ddim", ...)``: the update rules as pure functions of Python floats
  (alpha-bar_t, sigmas, solver weights, eta, ...) to the 14 coefficients of the fused op. No tables,
  no state, no torch tensors: a kernel user steps a sampler with them and no scheduler, and the
  tests check them against float64 formulas.
- ``schedulers/`` (here): everything that decides which rule a step uses and with which numbers: the
  noise tables (``beta_schedules``, ``sigma_schedules``), the run's timesteps (``timesteps``), the
  state of a run (step index, earlier outputs, Heun's first stage), configs as diffusers saves them,
  the per-sample work that is no coefficient (``fused_step``: the inputs' layout, the multistep
  solvers' dynamic thresholding) and random noise drawn in diffusers' order. A scheduler writes no
  update formula itself: it asks a rule for the coefficients and hands them to the fused op, with
  its ``threshold`` and ``variance`` arguments where the update takes them (DDPM, DDIM), else
  splitting the update over two calls where thresholding needs x0 first (multistep solvers).

Modules: ``scheduling_<name>.py`` holds one scheduler (diffusers' file names); their bases are
``scheduling_base`` (SchedulerMixin, SchedulerOutput, StepIndexMixin), ``alpha_bar_scheduler``
(DDPM, DDIM, PNDM), ``sigma_scheduler`` (Euler, Euler ancestral, Heun, LMS) and
``multistep_scheduler`` (DPM-Solver, DEIS, UniPC). ``registry`` lists every scheduler once; this
package's exports, fusediff's, the schedulers' compatible classes and the CLI's ``--scheduler``
names are read from it.
"""

from ..utils.lazy import lazy_exports
from .registry import exports

# exported on first use (utils/lazy.py): name -> submodule, from the registry
_LAZY = exports()
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

__all__ = list(_LAZY)
