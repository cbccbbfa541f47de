"""The fused scheduler step over fusediff._C, registered as ``torch.ops.fusediff.scheduler_step``.

Layering (DESIGN.md): pybind op (csrc/bindings.cpp) -> :func:`launch`, which hands data
pointers to the C++ or CUDA path -> the custom op and its fake, which ``torch.compile`` traces
and ``torch.library.opcheck`` tests -> ``fusediff.kernels.scheduler_step``, which calls
:func:`launch` directly in eager mode (no dispatcher overhead in the sampling loop) and the
custom op under ``torch.compile``. The update is not differentiable here; the public function
routes tensors that need gradients to the reference.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Sequence

import torch

from . import _ext
from .scheduler_step_coeffs import NUM_COEFFS

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ZEROS = (0.0,) * NUM_COEFFS


def _f32(v: float) -> float:
    """v rounded to the nearest float32 (ties to even)."""
    return struct.unpack("f", struct.pack("f", v))[0]


@functools.lru_cache(maxsize=64)
def quantile_rank(n: int, ratio: float) -> tuple[int, int, float]:
    """(below, above, weight): where torch.quantile(., ratio) of n values reads its sorted input.

    As ATen computes it: rank = q*(n - 1) in the input's dtype (float32 here; exact as the
    float32 rounding of a product of two float32 values, which double holds exactly),
    below = floor(rank), above = ceil(rank), weight = rank - below (exact in float32).
    """
    rank = _f32(_f32(ratio) * float(n - 1))
    below = int(rank)
    return below, math.ceil(rank), rank - below


def _raw_stream(index: int) -> int:
    """The current CUDA stream of device ``index`` as an integer handle (the capture stream
    inside a CUDA-graph capture). PyTorch's private getter is ~10x cheaper than current_stream()."""
    getter = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if getter is not None:
        return getter(index)
    return torch.cuda.current_stream(index).cuda_stream


def _batch_stride(t: torch.Tensor | None, inner: int) -> int:
    """Elements between items (dim 0) of a batch-strided input; -1 when dense."""
    if t is None or t.dim() == 0 or t.shape[0] <= 1 or t.stride(0) == inner:
        return -1
    return t.stride(0)


def launch(sample: torch.Tensor, model_output: torch.Tensor, coeffs: Sequence[float] | torch.Tensor,
           noise: torch.Tensor | None, history: Sequence[torch.Tensor], out: torch.Tensor,
           pred: torch.Tensor | None, variance: torch.Tensor | None = None,
           threshold: tuple[float, float] | None = None) -> None:
    """Run the fused update into ``out`` (and ``pred``). Inputs must already be validated:
    same shape, dtype (fp32/fp16/bf16), device and dense layout (model_output and variance may be
    batch-strided); ``coeffs`` 14 floats, or a float32 tensor of 14 (on the CPU, or on the data's
    CUDA device, where the kernel reads it); ``threshold`` (ratio, max_value) or None."""
    numel = sample.numel()
    batch = sample.shape[0] if sample.dim() > 0 and numel > 0 else 1
    inner = numel // batch
    args = (
        sample.data_ptr(),
        model_output.data_ptr(),
        0 if noise is None else noise.data_ptr(),
        [h.data_ptr() for h in history],
        out.data_ptr(),
        0 if pred is None else pred.data_ptr(),
        numel,
        DTYPE_CODES[sample.dtype],
    )
    thresh = None
    if threshold is not None and numel > 0:
        ratio, max_value = threshold
        thresh = (*quantile_rank(inner, float(ratio)), float(max_value))
    extra = dict(variance=0 if variance is None else variance.data_ptr(), batch=batch,
                 m_batch_stride=_batch_stride(model_output, inner), v_batch_stride=_batch_stride(variance, inner),
                 threshold=thresh)
    if sample.is_cuda:
        C = _ext.require(cuda=True)
        if isinstance(coeffs, torch.Tensor) and coeffs.is_cuda:
            host, dev = _ZEROS, coeffs.data_ptr()
        else:  # host values are passed by value
            host, dev = coeffs.tolist() if isinstance(coeffs, torch.Tensor) else coeffs, 0
        index = sample.device.index
        if index is None:
            index = torch.cuda.current_device()
        # s per item, written by the select kernel and read by the step kernel (caching allocator: no sync)
        scale = torch.empty(batch, dtype=torch.float32, device=sample.device) if thresh else None
        C.scheduler_step_cuda(*args, host, dev, _raw_stream(index), index, **extra,
                              scale=0 if scale is None else scale.data_ptr())
    else:
        C = _ext.require()
        if isinstance(coeffs, torch.Tensor):
            coeffs = coeffs.tolist()
        C.scheduler_step_cpu(*args, coeffs, **extra)


def _acceptable(t: torch.Tensor, sample: torch.Tensor) -> bool:
    """Whether the kernels can read t as it is (the layout checks of scheduler_step's validation)."""
    from .scheduler_step import item_dense

    return t.stride() == sample.stride() or (sample.is_contiguous() and item_dense(t))


@torch.library.custom_op("fusediff::scheduler_step", mutates_args=(), device_types=("cpu", "cuda"))
def scheduler_step_op(sample: torch.Tensor, model_output: torch.Tensor, coeffs: torch.Tensor,
                      noise: torch.Tensor | None, history: list[torch.Tensor], return_pred: bool,
                      variance: torch.Tensor | None = None, threshold_ratio: float = 0.0,
                      threshold_max_value: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused scheduler step; returns (prev_sample, x0), x0 empty unless ``return_pred``.
    ``threshold_ratio`` > 0 turns on dynamic thresholding with (ratio, max_value)."""
    # A compiler may hand over other strides than eager validation saw: make such inputs dense.
    from .scheduler_step import _dense

    if not _dense(sample):
        sample = sample.contiguous()
    if not _acceptable(model_output, sample):
        model_output = model_output.contiguous()
    if variance is not None and not _acceptable(variance, sample):
        variance = variance.contiguous()
    if noise is not None and noise.stride() != sample.stride():
        noise = noise.contiguous()
    history = [h if h.stride() == sample.stride() else h.contiguous() for h in history]
    out = torch.empty_like(sample)
    pred = torch.empty_like(sample) if return_pred else sample.new_empty(0)
    threshold = (threshold_ratio, threshold_max_value) if threshold_ratio > 0 else None
    launch(sample, model_output, coeffs, noise, history, out, pred if return_pred else None, variance, threshold)
    return out, pred


@scheduler_step_op.register_fake
def _(sample, model_output, coeffs, noise, history, return_pred, variance=None, threshold_ratio=0.0,
      threshold_max_value=1.0):
    pred = torch.empty_like(sample) if return_pred else sample.new_empty(0)
    return torch.empty_like(sample), pred
