"""The fused scheduler step over fusediff._C, registered as ``torch.ops.fusediff.scheduler_step``.

Layering (DESIGN.md): pybind op (csrc/bindings.cpp) -> :func:`launch`, which hands data
pointers to the C++ or CUDA path -> the custom op and its fake, which ``torch.compile`` traces
and ``torch.library.opcheck`` tests -> ``fusediff.kernels.scheduler_step``, which calls
:func:`launch` directly in eager mode (no dispatcher overhead in the sampling loop) and the
custom op under ``torch.compile``. The update is not differentiable here; the public function
routes tensors that need gradients to the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _ext

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ZEROS = (0.0,) * 12


def _raw_stream(index: int) -> int:
    """The current CUDA stream of device ``index`` as an integer handle (the capture stream
    inside a CUDA-graph capture). PyTorch's private getter is ~10x cheaper than current_stream()."""
    getter = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if getter is not None:
        return getter(index)
    return torch.cuda.current_stream(index).cuda_stream


def launch(sample: torch.Tensor, model_output: torch.Tensor, coeffs: Sequence[float] | torch.Tensor,
           noise: torch.Tensor | None, history: Sequence[torch.Tensor], out: torch.Tensor,
           pred: torch.Tensor | None) -> None:
    """Run the fused update into ``out`` (and ``pred``). Inputs must already be validated:
    same shape, dtype (fp32/fp16/bf16), device and dense layout; ``coeffs`` 12 floats, or a
    float32 tensor of 12 (on the CPU, or on the data's CUDA device, where the kernel reads it)."""
    args = (
        sample.data_ptr(),
        model_output.data_ptr(),
        0 if noise is None else noise.data_ptr(),
        [h.data_ptr() for h in history],
        out.data_ptr(),
        0 if pred is None else pred.data_ptr(),
        sample.numel(),
        DTYPE_CODES[sample.dtype],
    )
    if sample.is_cuda:
        C = _ext.require(cuda=True)
        if isinstance(coeffs, torch.Tensor) and coeffs.is_cuda:
            host, dev = _ZEROS, coeffs.data_ptr()
        else:  # host values are passed by value
            host, dev = coeffs.tolist() if isinstance(coeffs, torch.Tensor) else coeffs, 0
        index = sample.device.index
        if index is None:
            index = torch.cuda.current_device()
        C.scheduler_step_cuda(*args, host, dev, _raw_stream(index), index)
    else:
        C = _ext.require()
        if isinstance(coeffs, torch.Tensor):
            coeffs = coeffs.tolist()
        C.scheduler_step_cpu(*args, coeffs)


@torch.library.custom_op("fusediff::scheduler_step", mutates_args=(), device_types=("cpu", "cuda"))
def scheduler_step_op(sample: torch.Tensor, model_output: torch.Tensor, coeffs: torch.Tensor,
                      noise: torch.Tensor | None, history: list[torch.Tensor],
                      return_pred: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused scheduler step; returns (prev_sample, x0), x0 empty unless ``return_pred``."""
    out = torch.empty_like(sample)
    pred = torch.empty_like(sample) if return_pred else sample.new_empty(0)
    launch(sample, model_output, coeffs, noise, history, out, pred if return_pred else None)
    return out, pred


@scheduler_step_op.register_fake
def _(sample, model_output, coeffs, noise, history, return_pred):
    pred = torch.empty_like(sample) if return_pred else sample.new_empty(0)
    return torch.empty_like(sample), pred
