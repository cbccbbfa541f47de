"""Fused scheduler step: one pass over memory for a whole sampler update.

Reads the sample x, the model output m, the optional noise n, an optional per-element
variance v and up to four history tensors h_j, and writes the previous sample (and,
optionally, the clipped or thresholded x0 prediction):

    n   = n * exp(V_A + V_B*v)      with a variance input (DDPM's learned_range; needs noise)
    x0  = P_X*x + P_M*m + P_N*n,  clamped to [-clip, clip] when clip > 0
    out = C_X*x + C_M*m + C_N*n + C_X0*x0 + sum_j C_H[j]*h_j

Dynamic thresholding (Saharia et al. 2022, sec. 2.3; diffusers' ``_threshold_sample``), the
``threshold=(ratio, max_value)`` argument, replaces the clip: per item b along dim 0, with x0r
= x0 rounded to the sample's dtype,

    s_b = clamp(torch.quantile(|x0r| in fp32 over the item, ratio), 1, max_value)
    x0  = round_to_dtype(clamp(x0r, -s_b, s_b) / s_b)

exactly as torch computes it (rank = ratio*(n - 1) in fp32; torch's lerp, a single fused
multiply-add as its CUDA and AVX2/AVX-512 CPU kernels compute it, so the fused result is bit-exact
to torch there, within an ulp of s on other CPUs; a NaN in the item makes s_b, and so the item's
x0, NaN). Rounding x0 to the dtype first is what diffusers does (its x0 is a tensor of the model's
dtype). Items are limited to 2^24 elements, torch.quantile's limit. The noise scale is computed in
fp32 for every dtype (diffusers computes it in the model's dtype, e.g. fp16 for DeepFloyd IF).

:mod:`fusediff.kernels.scheduler_step_coeffs` turns DDPM, DDIM, PNDM/PLMS, Euler, Euler
ancestral, Heun, LMS, DPM-Solver(++) 1/2/3M and DEIS updates into these coefficients, and
:mod:`~fusediff.kernels.scheduler_step_unipc` UniPC's. :func:`scheduler_step_ref`
is the definition (PyTorch, any device); the fused paths are C++ on the CPU and CUDA on the
GPU (csrc/), arithmetic in fp32 for fp32, fp16 and bf16 tensors; on CUDA thresholding is a
select kernel (a radix select of the quantile per item) and the step kernel, two launches with
no host synchronisation, so the step stays CUDA-graph capturable. Dispatch follows DESIGN.md
decision 2; gradients and float64 go to the reference.

model_output and variance may be "batch-strided" views, such as the two halves of a (B, 2C, ...)
model output split along dim 1: same shape as a contiguous sample, dense within each item, any
stride between items. Other tensors share the sample's dense layout (contiguous, or
channels-last).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import _backend, _ext
from . import scheduler_step_ext as _step_ext
from .scheduler_step_coeffs import MAX_HISTORY, NUM_COEFFS, StepCoeffs

Coeffs = StepCoeffs | Sequence[float] | torch.Tensor
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_DTYPES = _FUSED_DTYPES + (torch.float64,)
MAX_THRESHOLD_ITEM = 1 << 24  # torch.quantile's limit on the elements it reduces over


class DynamicThreshold(NamedTuple):
    """Dynamic thresholding of x0 (Saharia et al. 2022, sec. 2.3): diffusers'
    ``dynamic_thresholding_ratio`` (the quantile of |x0|, in (0, 1]) and ``sample_max_value``
    (the cap of the scale, >= 1)."""

    ratio: float
    max_value: float


def _coeff_values(coeffs: Coeffs) -> Sequence[float] | torch.Tensor:
    """14 floats, or a float32 tensor of shape (14,); raises on anything else."""
    if type(coeffs) is StepCoeffs:  # already the 14-tuple the kernels read
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


def item_dense(t: torch.Tensor) -> bool:
    """Whether each item t[b] (dim 0) is contiguous, whatever the stride between items."""
    expect = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expect:
            return False
        expect *= size
    return t.dim() == 0 or t.stride(0) >= 0


def _check_like(name: str, t: object, sample: torch.Tensor, batch_strided: bool = False) -> None:
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
    if batch_strided and sample.is_contiguous() and item_dense(t):
        return  # a batch-strided view, e.g. one half of a (B, 2C, ...) model output
    if t.stride() != sample.stride():
        also = (" or, with a contiguous sample, be dense within each item (dim 0)" if batch_strided else "")
        raise ValueError(
            f"scheduler_step: {name} has strides {t.stride()}, sample has {sample.stride()}; tensors must "
            f"share the sample's dense layout{also} (call .contiguous())")


def _extent(t: torch.Tensor) -> int:
    """Bytes from t's first element to just past its last (strides >= 0)."""
    if t.numel() == 0:
        return 0
    return (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) * t.element_size()


def _check_out(name: str, t: torch.Tensor, sample: torch.Tensor, inputs: Sequence[torch.Tensor]) -> None:
    _check_like(name, t, sample)
    if torch.compiler.is_compiling():
        return  # traced tensors have no addresses; the compiled step is computed out of place, then copied in
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    for x in inputs:
        x_lo = x.data_ptr()
        same_layout = x.stride() == t.stride()
        if x_lo == lo and same_layout:
            continue  # the input itself (out=sample)
        x_hi = x_lo + (x.numel() * x.element_size() if same_layout else _extent(x))  # _extent: batch-strided views
        if x_lo < hi and lo < x_hi:
            raise ValueError(f"scheduler_step: {name} partly overlaps an input (it may only be one exactly)")


def _check_threshold(threshold, sample: torch.Tensor, values) -> DynamicThreshold | None:
    if threshold is None:
        return None
    try:
        ratio, max_value = (float(v) for v in threshold)
    except (TypeError, ValueError):
        raise TypeError("scheduler_step: threshold must be a pair (ratio, max_value) of floats; got "
                        f"{threshold!r}") from None
    if not 0 < ratio <= 1:
        raise ValueError(f"scheduler_step: threshold ratio (a quantile) must be in (0, 1]; got {ratio}")
    if not max_value >= 1:
        raise ValueError(f"scheduler_step: threshold max_value must be >= 1; got {max_value}")
    if sample.dim() < 2:
        raise ValueError("scheduler_step: dynamic thresholding needs a batch dimension; got a sample of shape "
                         f"{tuple(sample.shape)}")
    inner = math.prod(sample.shape[1:])
    if sample.numel() and not 0 < inner <= MAX_THRESHOLD_ITEM:
        raise ValueError(f"scheduler_step: dynamic thresholding takes 1 to 2^24 elements per item (the "
                         f"limit of torch.quantile); got {inner}")
    if not isinstance(values, torch.Tensor) and float(values[11]) > 0:  # a tensor is not read (no sync, traceable)
        raise ValueError("scheduler_step: dynamic thresholding replaces clipping; set clip to 0")
    return DynamicThreshold(ratio, max_value)


def _validate(sample, model_output, coeffs, noise, history, out, pred_out, variance=None, threshold=None):
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
    _check_like("model_output", model_output, sample, batch_strided=True)
    if noise is not None:
        _check_like("noise", noise, sample)
    if variance is not None:
        if noise is None:
            raise ValueError("scheduler_step: variance scales the noise; it needs noise")
        _check_like("variance", variance, sample, batch_strided=True)
    for j, h in enumerate(history):
        _check_like(f"history[{j}]", h, sample)
    values = _coeff_values(coeffs)
    if isinstance(values, torch.Tensor) and values.device != sample.device and values.device.type != "cpu":
        raise ValueError(f"scheduler_step: coeffs is on {values.device}, sample is on {sample.device}")
    threshold = _check_threshold(threshold, sample, values)
    inputs = [sample, model_output, *history] + [t for t in (noise, variance) if t is not None]
    if out is not None:
        _check_out("out", out, sample, inputs)
    if pred_out is not None:
        _check_out("pred_out", pred_out, sample, inputs)
    return values, history, threshold


def scheduler_step_ref(sample: torch.Tensor, model_output: torch.Tensor, coeffs: Coeffs, *,
                       noise: torch.Tensor | None = None, history: Sequence[torch.Tensor] = (),
                       variance: torch.Tensor | None = None,
                       threshold: DynamicThreshold | tuple[float, float] | None = None,
                       return_pred: bool = False):
    """The definition of the fused step in PyTorch: fp32 arithmetic (fp64 for fp64 tensors)."""
    values, history, threshold = _validate(sample, model_output, coeffs, noise, history, None, None,
                                           variance, threshold)
    return _ref(sample, model_output, values, noise, history, return_pred, variance, threshold)


def dynamic_threshold_ref(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding of x0 per item along dim 0 (Saharia et al. 2022, sec. 2.3), as diffusers'
    ``_threshold_sample``: s = clamp(quantile(|x0|, ratio), 1, max_value), x0 <- clamp(x0, -s, s) / s,
    computed in fp32 for half-precision x0 (fp64 for fp64) and returned in x0's dtype and layout."""
    if x0.dim() < 2:
        raise ValueError(f"dynamic thresholding needs a batch dimension; got a sample of shape {tuple(x0.shape)}")
    if x0.numel() == 0:
        return x0.clone()
    flat = x0.reshape(x0.shape[0], -1)  # (B, C*H*W)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)  # (B, 1)
    t = (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)
    return t if t.stride() == x0.stride() else torch.empty_like(x0).copy_(t)


def _ref(sample, model_output, values, noise, history, return_pred, variance=None, threshold=None):
    """scheduler_step_ref on inputs already validated."""
    compute = torch.float64 if sample.dtype == torch.float64 else torch.float32
    c = torch.as_tensor(values, dtype=compute, device=sample.device)
    x, m = sample.to(compute), model_output.to(compute)
    n = None if noise is None else noise.to(compute)
    if variance is not None:  # n <- n * exp(V_A + V_B*v)
        n = n * torch.exp(c[12] + c[13] * variance.to(compute))
    x0 = c[0] * x + c[1] * m
    if n is not None:
        x0 = x0 + c[2] * n
    if threshold is None:
        clip = c[11]
        x0 = torch.where(clip > 0, torch.clamp(x0, -clip, clip), x0)
    else:  # thresholding replaces the clip; x0 is rounded to the sample's dtype first
        x0 = dynamic_threshold_ref(x0.to(sample.dtype), *threshold).to(compute)
    out = c[3] * x + c[4] * m + c[6] * x0
    if n is not None:
        out = out + c[5] * n
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
                   variance: torch.Tensor | None = None,
                   threshold: DynamicThreshold | tuple[float, float] | None = None,
                   return_pred: bool = False, out: torch.Tensor | None = None,
                   pred_out: torch.Tensor | None = None):
    """One scheduler update in a single pass over memory.

    Args:
        sample: x_t, the current sample, of any shape; float32, float16, bfloat16 (fused)
            or float64 (reference); contiguous or channels-last.
        model_output: the model's prediction for x_t, same shape, dtype, device and layout, or
            a batch-strided view (with a contiguous sample: dense within each item along dim 0).
        coeffs: a :class:`StepCoeffs` (see ``scheduler_step_coeffs``), 14 floats, or a float32
            tensor of shape (14,) on the CPU or on the sample's device. A device tensor is read
            by the kernel itself, so a captured CUDA graph can replay the step while the
            coefficients change between replays.
        noise: noise z for stochastic rules (DDPM, DDIM with eta > 0, ancestral), or None.
        history: up to 4 earlier model outputs (PLMS) or x0 predictions (DPM-Solver++), most
            recent first.
        variance: per-element v scaling the noise by exp(v_a + v_b*v) (DDPM's learned_range,
            the second half of the model output); like model_output, may be batch-strided.
            Needs ``noise``.
        threshold: ``(ratio, max_value)`` (a :class:`DynamicThreshold`) for dynamic thresholding
            of x0 per item along dim 0 (the sample needs >= 2 dims); it replaces the clip: clip > 0
            is a ValueError (in a coefficient tensor, which is not read on the host, it is ignored).
        return_pred: also return x0 after clipping or thresholding (what DPM-Solver++ keeps as
            history, and diffusers' ``pred_original_sample``).
        out, pred_out: optional tensors to write into; ``out`` may be ``sample`` itself.

    Returns:
        The previous sample x_{t-1}, or ``(x_{t-1}, x0)`` when ``return_pred`` is set.
    """
    values, history, threshold = _validate(sample, model_output, coeffs, noise, history, out, pred_out,
                                           variance, threshold)
    tensors = [sample, model_output, *history] + [t for t in (noise, variance) if t is not None]
    if not _use_fused(sample, tensors):
        res = _ref(sample, model_output, values, noise, history, return_pred or pred_out is not None,
                   variance, threshold)
        prev, pred = res if isinstance(res, tuple) else (res, None)
        return _into(prev, pred, out, pred_out, return_pred)

    if torch.compiler.is_compiling():
        c = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float32)
        ratio, max_value = threshold if threshold is not None else (0.0, 1.0)
        prev, pred = torch.ops.fusediff.scheduler_step(
            sample, model_output, c, noise, list(history), return_pred or pred_out is not None,
            variance, ratio, max_value)
        return _into(prev, pred, out, pred_out, return_pred)

    prev = torch.empty_like(sample) if out is None else out
    pred = pred_out if pred_out is not None else (torch.empty_like(sample) if return_pred else None)
    _step_ext.launch(sample, model_output, values, noise, history, prev, pred, variance, threshold)
    return (prev, pred) if return_pred else prev
