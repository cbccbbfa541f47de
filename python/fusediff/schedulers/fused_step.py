"""The schedulers' way into the fused scheduler step: inputs in the form the op takes, and one update as
one call (:func:`fused_update`).

Every ``step`` ends in :func:`fusediff.kernels.scheduler_step` with coefficients from
:mod:`fusediff.kernels.scheduler_step_coeffs`. The op itself takes per-element noise scales of the
form exp(v_a + v_b*v) (DDPM's learned_range: ``variance=``) and dynamic thresholding of x0 (Saharia
et al. 2022, sec. 2.3: ``threshold=``). DDPM and DDIM pass both in their one call; the multistep
solvers get the thresholded x0 from a first call and update from it in a second (eps solvers
re-derive eps from it). What remains in PyTorch: DDPM's ``learned`` variance (sigma = sqrt(v), folded
into the noise by the scheduler) and unCLIP's learned_range (its scheduler folds the scale into the
noise; :func:`~fusediff.kernels.scheduler_step_coeffs.learned_range` gives the op's coefficients).

Limits: the fused op takes one dtype and a dense layout (contiguous, or channels-last for 4-D
samples; with a contiguous sample, the model output and the variance may also be views strided
along the batch dimension, e.g. the halves of a (B, 2C, ...) output); :func:`step_inputs` and
:func:`like` copy where the inputs differ, and leave tensors of another shape or device for the op
to refuse with a message that names them.
"""

from __future__ import annotations

import torch

from ..kernels import DynamicThreshold, scheduler_step
from ..kernels.scheduler_step import item_dense
from ..kernels.scheduler_step_coeffs import StepCoeffs


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def step_inputs(sample: torch.Tensor, model_output: torch.Tensor, batch_strided: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample`` and ``model_output`` in one dtype and one dense layout, as the fused op takes them.

    The dtype is the one PyTorch promotes the pair to, which is the dtype diffusers' step
    returns for mixed inputs (e.g. a float16 model output on a float32 sample gives float32).
    With ``batch_strided``, a model output that is a batch-strided view (see :func:`like`) is kept.
    """
    for name, t in (("sample", sample), ("model_output", model_output)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"step: {name} must be a torch.Tensor; got {type(t).__name__}")
    dtype = torch.promote_types(sample.dtype, model_output.dtype)
    if sample.dtype != dtype:
        sample = sample.to(dtype)  # keeps a dense layout
    if not _dense(sample):
        sample = sample.contiguous()
    return sample, like(model_output, sample, batch_strided)


def like(t: torch.Tensor, ref: torch.Tensor, batch_strided: bool = False) -> torch.Tensor:
    """``t`` in ``ref``'s dtype and memory layout (a copy only where they differ).

    With ``batch_strided``, a view that the fused op reads as it is (``ref`` contiguous, ``t``
    contiguous within each item along dim 0, any stride between items: the model output or
    variance half of a (B, 2C, ...) output) is not copied either. Tensors of another shape or
    device are returned as they are, for the fused op to refuse with a message that names them.
    """
    if not isinstance(t, torch.Tensor) or t.shape != ref.shape or t.device != ref.device:
        return t
    if t.dtype == ref.dtype and (t.stride() == ref.stride()
                                 or (batch_strided and ref.is_contiguous() and item_dense(t))):
        return t
    return torch.empty_like(ref).copy_(t)


def fused_update(sample: torch.Tensor, model_output: torch.Tensor, coeffs: StepCoeffs, *,
                 noise: torch.Tensor | None = None, variance: torch.Tensor | None = None,
                 threshold: DynamicThreshold | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_prev, x0) of one update in one fused call: x0 clipped by ``coeffs.clip`` or dynamically
    thresholded (``threshold``), the noise scaled per element by exp(v_a + v_b*variance)."""
    return scheduler_step(sample, model_output, coeffs, noise=noise, variance=variance, threshold=threshold,
                          return_pred=True)
