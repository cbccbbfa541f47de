"""fusediff.kernels: fused GPU kernels with plain-PyTorch references.

Each op lives in its own module with a public function, its ``*_ref`` definition and the
dispatch between them (DESIGN.md, decision 2). Select backends with ``FUSEDIFF_KERNELS``
(``auto``, ``fused``, ``ref``) or :func:`use_backend`.
"""

from . import scheduler_step_coeffs
from ._backend import BACKENDS, get_backend, reload_environment, use_backend
from ._ext import has_cuda_kernels
from .attention import attention, attention_ref
from .geglu import geglu, geglu_ref
from .group_norm import group_norm, group_norm_ref
from .layer_norm import layer_norm, layer_norm_ref
from .scheduler_step import DynamicThreshold, dynamic_threshold_ref, scheduler_step, scheduler_step_ref
from .scheduler_step_coeffs import RULES, StepCoeffs, step_coeffs
from .timestep_embedding import timestep_embedding, timestep_embedding_ref
from .timestep_mlp import timestep_mlp, timestep_mlp_ref, timestep_mlp_runs_fused
from . import scheduler_step_ext as _scheduler_step_ext  # noqa: F401  registers torch.ops.fusediff.scheduler_step

__all__ = [
    "BACKENDS",
    "DynamicThreshold",
    "RULES",
    "StepCoeffs",
    "attention",
    "attention_ref",
    "dynamic_threshold_ref",
    "geglu",
    "geglu_ref",
    "get_backend",
    "group_norm",
    "group_norm_ref",
    "has_cuda_kernels",
    "layer_norm",
    "layer_norm_ref",
    "scheduler_step",
    "scheduler_step_coeffs",
    "scheduler_step_ref",
    "step_coeffs",
    "timestep_embedding",
    "timestep_embedding_ref",
    "timestep_mlp",
    "timestep_mlp_ref",
    "timestep_mlp_runs_fused",
    "reload_environment",
    "use_backend",
]
