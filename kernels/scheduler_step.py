"""Fused scheduler step: one pass over memory for a whole sampler update.

Reads the sample x, the model output m, the optional noise n and up to four history tensors
h_j, and writes the previous sample (and, optionally, the clipped x0 prediction):

    x0  = P_X*x + P_M*m + P_N*n,  clamped to [-clip, clip] when clip > 0
    out = C_X*x + C_M*m + C_N*n + C_X0*x0 + sum_j C_H[j]*h_j

:mod:`fusediff.kernels.scheduler_step_coeffs` turns DDPM, DDIM, PNDM/PLMS, Euler, Euler
ancestral, Heun, LMS, DPM-Solver(++) 1/2/3M and DEIS updates into these coefficients, and
:mod:`~fusediff.kernels.scheduler_step_unipc` UniPC's. :func:`scheduler_step_ref`
is the definition (PyTorch, any device); the fused paths are C++ on the CPU and CUDA on the
GPU (csrc/), arithmetic in fp32 for fp32, fp16 and bf16 tensors. Dispatch follows
DESIGN.md decision 2; gradients and float64 go to the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _backend, _ext
from . import scheduler_step_ext as _step_ext
from .scheduler_step_coeffs import MAX_HISTORY, NUM_COEFFS, StepCoeffs

Coeffs = StepCoeffs | Sequence[float] | torch.Tensor
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_DTYPES = _FUSED_DTYPES + (torch.float64,)


def _coeff_values(coeffs: Coeffs) -> Sequence[float] | torch.Tensor:
    """12 floats, or a float32 tensor of shape (12,); raises on anything else."""
    if type(coeffs) is StepCoeffs:  # already the 12-tuple the kernels read
        return coeffs
    if isinstance(coeffs, torch.Tensor):
        if coeffs.shape != (NUM_COEFFS,) or coeffs.dtype != torch.float32 or not coeffs.is_contiguous():
            raise ValueError(
                f"coeffs tensor must be contiguous float32 of shape ({NUM_COEFFS},); got "
                f"{coeffs.dtype} of shape {tuple(coeffs.shape)}")
        return coeffs
    values = [float(c) for c in coeffs]
    if len(values) != NUM_COEFFS:
        raise ValueError(f"coeffs must hold {NUM_COEFFS} values; got {len(values)}")
    return values


def _dense(t: torch.Tensor) -> bool:
    """Contiguous, or channels-last: a layout whose elements fill memory without gaps."""
    if t.is_contiguous():
        return True
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    return t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)


def _check_like(name: str, t: object, sample: torch.Tensor) -> None:
    if (isinstance(t, torch.Tensor) and t.shape == sample.shape and t.dtype == sample.dtype
            and t.device == sample.device and t.stride() == sample.stride()):
        return  # the common case, checked in one expression: this runs every sampling step
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"scheduler_step: {name} must be a torch.Tensor; got {type(t).__name__}")
    if t.shape != sample.shape:
        raise ValueError(f"scheduler_step: {name} has shape {tuple(t.shape)}, sample has {tuple(sample.shape)}")
    if t.dtype != sample.dtype:
        raise ValueError(f"scheduler_step: {name} is {t.dtype}, sample is {sample.dtype}")
    if t.device != sample.device:
        raise ValueError(f"scheduler_step: {name} is on {t.device}, sample is on {sample.device}")
    if t.stride() != sample.stride():
        raise ValueError(
            f"scheduler_step: {name} has strides {t.stride()}, sample has {sample.stride()}; all "
            "tensors must share one dense layout (call .contiguous())")


def _check_out(name: str, t: torch.Tensor, sample: torch.Tensor, inputs: Sequence[torch.Tensor]) -> None:
    _check_like(name, t, sample)
    if torch.compiler.is_compiling():
        return  # traced tensors have no addresses; the compiled step is computed out of place, then copied in
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    for x in inputs:
        x_lo = x.data_ptr()
        if x_lo != lo and x_lo < hi and lo < x_lo + x.numel() * x.element_size():
            raise ValueError(f"scheduler_step: {name} partly overlaps an input (it may only be one exactly)")


def _validate(sample, model_output, coeffs, noise, history, out, pred_out):
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"scheduler_step: sample must be a torch.Tensor; got {type(sample).__name__}")
    if sample.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"scheduler_step: tensors must be float32, float16, bfloat16 or float64; got {sample.dtype}")
    if not _dense(sample):
        raise ValueError(
            "scheduler_step: sample is not contiguous (nor channels-last); call .contiguous() first")
    if isinstance(history, torch.Tensor):
        raise TypeError("scheduler_step: history must be a sequence of tensors, not a tensor")
    history = tuple(history)
    if len(history) > MAX_HISTORY:
        raise ValueError(f"scheduler_step: at most {MAX_HISTORY} history tensors; got {len(history)}")
    _check_like("model_output", model_output, sample)
    if noise is not None:
        _check_like("noise", noise, sample)
    for j, h in enumerate(history):
        _check_like(f"history[{j}]", h, sample)
    values = _coeff_values(coeffs)
    if isinstance(values, torch.Tensor) and values.device != sample.device and values.device.type != "cpu":
        raise ValueError(f"scheduler_step: coeffs is on {values.device}, sample is on {sample.device}")
    inputs = [sample, model_output, *history] + ([] if noise is None else [noise])
    if out is not None:
        _check_out("out", out, sample, inputs)
    if pred_out is not None:
        _check_out("pred_out", pred_out, sample, inputs)
    return values, history


def scheduler_step_ref(sample: torch.Tensor, model_output: torch.Tensor, coeffs: Coeffs, *,
                       noise: torch.Tensor | None = None, history: Sequence[torch.Tensor] = (),
                       return_pred: bool = False):
    """The definition of the fused step in PyTorch: fp32 arithmetic (fp64 for fp64 tensors)."""
    values, history = _validate(sample, model_output, coeffs, noise, history, None, None)
    return _ref(sample, model_output, values, noise, history, return_pred)


def _ref(sample, model_output, values, noise, history, return_pred):
    """scheduler_step_ref on inputs already validated."""
    compute = torch.float64 if sample.dtype == torch.float64 else torch.float32
    c = torch.as_tensor(values, dtype=compute, device=sample.device)
    x, m = sample.to(compute), model_output.to(compute)
    x0 = c[0] * x + c[1] * m
    if noise is not None:
        x0 = x0 + c[2] * noise.to(compute)
    clip = c[11]
    x0 = torch.where(clip > 0, torch.clamp(x0, -clip, clip), x0)
    out = c[3] * x + c[4] * m + c[6] * x0
    if noise is not None:
        out = out + c[5] * noise.to(compute)
    for j, h in enumerate(history):
        out = out + c[7 + j] * h.to(compute)
    out = out.to(sample.dtype)
    return (out, x0.to(sample.dtype)) if return_pred else out


def _use_fused(sample: torch.Tensor, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether this call runs fused code: DESIGN.md decision 2, plus no autograd and fp32/16/bf16."""
    backend = _backend.get_backend()
    if backend == "ref" or sample.dtype not in _FUSED_DTYPES:
        return False
    if torch.is_grad_enabled():
        for t in tensors:
            if t.requires_grad:
                return False
    if sample.is_cuda:
        return backend == "fused" or _ext.has_cuda_kernels()  # "fused" raises later if missing
    return backend == "fused" and sample.is_cpu


def _into(prev, pred, out, pred_out, return_pred):
    """Copy results computed out of place into the caller's ``out``/``pred_out``; shape the return."""
    if out is not None:
        prev = out.copy_(prev)
    if pred_out is not None:
        pred = pred_out.copy_(pred)
    return (prev, pred) if return_pred else prev


def scheduler_step(sample: torch.Tensor, model_output: torch.Tensor, coeffs: Coeffs, *,
                   noise: torch.Tensor | None = None, history: Sequence[torch.Tensor] = (),
                   return_pred: bool = False, out: torch.Tensor | None = None,
                   pred_out: torch.Tensor | None = None):
    """One scheduler update in a single pass over memory.

    Args:
        sample: x_t, the current sample, of any shape; float32, float16, bfloat16 (fused)
            or float64 (reference); contiguous or channels-last.
        model_output: the model's prediction for x_t, same shape, dtype, device and layout.
        coeffs: a :class:`StepCoeffs` (see ``scheduler_step_coeffs``), 12 floats, or a float32
            tensor of shape (12,) on the CPU or on the sample's device. A device tensor is read
            by the kernel itself, so a captured CUDA graph can replay the step while the
            coefficients change between replays.
        noise: noise z for stochastic rules (DDPM, DDIM with eta > 0, ancestral), or None.
        history: up to 4 earlier model outputs (PLMS) or x0 predictions (DPM-Solver++), most
            recent first.
        return_pred: also return x0 after clipping (what DPM-Solver++ keeps as history).
        out, pred_out: optional tensors to write into; ``out`` may be ``sample`` itself.

    Returns:
        The previous sample x_{t-1}, or ``(x_{t-1}, x0)`` when ``return_pred`` is set.
    """
    values, history = _validate(sample, model_output, coeffs, noise, history, out, pred_out)
    tensors = [sample, model_output, *history] + ([] if noise is None else [noise])
    if not _use_fused(sample, tensors):
        res = _ref(sample, model_output, values, noise, history, return_pred or pred_out is not None)
        prev, pred = res if isinstance(res, tuple) else (res, None)
        return _into(prev, pred, out, pred_out, return_pred)

    if torch.compiler.is_compiling():
        c = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float32)
        prev, pred = torch.ops.fusediff.scheduler_step(
            sample, model_output, c, noise, list(history), return_pred or pred_out is not None)
        return _into(prev, pred, out, pred_out, return_pred)

    prev = torch.empty_like(sample) if out is None else out
    pred = pred_out if pred_out is not None else (torch.empty_like(sample) if return_pred else None)
    _step_ext.launch(sample, model_output, values, noise, history, prev, pred)
    return (prev, pred) if return_pred else prev
