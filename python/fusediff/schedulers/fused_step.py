"""The schedulers' way into the fused scheduler step: inputs in the form the op takes, one update as one
call (two around dynamic thresholding), and dynamic thresholding itself.

Every ``step`` ends in :func:`fusediff.kernels.scheduler_step` with coefficients from
:mod:`fusediff.kernels.scheduler_step_coeffs`. Rules that are not per-element coefficients are pre- or
post-processed in PyTorch around that call: per-element noise scales (DDPM's learned variances) are
folded into the noise by the scheduler, and dynamic thresholding of x0 (Saharia et al. 2022, sec. 2.3)
runs between a first call that yields x0 and the update (:func:`fused_update`).

Limits: the fused op takes one dtype and a dense layout (contiguous, or channels-last for 4-D
samples); :func:`step_inputs` and :func:`like` copy where the inputs differ, and leave tensors of
another shape or device for the op to refuse with a message that names them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels import scheduler_step
from ..kernels.scheduler_step_coeffs import StepCoeffs


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
