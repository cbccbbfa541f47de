"""LayerNorm over the last dim, optionally of a residual sum that it also returns.

x of shape (..., N) is normalised per row over its N features, then scaled and shifted:

    s = x + residual                                  when residual is given (rounded to x's dtype)
    y = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias

LayerNorm is Ba, Kiros & Hinton 2016 (arXiv:1607.06450), Sec. 3, Eq. 4 with the per-feature gain
and bias of its Sec. 3.1. The residual form is the pre-norm transformer block's pattern
``h = h + attn(norm1(h)); n = norm2(h)``: one op writes the new h and its norm, so the sum is read
once instead of three times (written by the add, read by the norm, read by the next add).

Definition (the reference): ``s = x + residual`` and ``torch.nn.functional.layer_norm(s, (N,),
weight, bias, eps)``, exactly what a transformer block computes with torch ops; so a model that
calls this op gives, on the reference path, the same bits as the unfused block.

The fused path (``layer_norm_triton.py``) rounds s to x's dtype as torch's add does (so s is the
reference's s bit for bit), and computes the statistics in float32 in two passes over registers,
the affine in float32, one rounding of y: y may differ from ATen's LayerNorm (Welford, other
summation order) in the last bits; the tests bound it by the house rule against float64.

Limits: x float32, float16, bfloat16 (fused) or float64 (reference); weight and bias (N,) or None,
any float dtype; residual of x's shape, dtype and device. The fused kernel needs a unit-stride last
dim for x and residual and N <= MAX_FUSED_N; it runs on CUDA tensors (and CPU tensors under
``FUSEDIFF_KERNELS=fused TRITON_INTERPRET=1``) when no gradient is recorded. Calls that need gradients,
and calls under ``torch.compile`` (where Inductor fuses the add and the norm itself), run the
reference.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
import torch.nn.functional as F

from . import _backend

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_DTYPES = _FUSED_DTYPES + (torch.float64,)
MAX_FUSED_N = 8192  # features per row the kernel holds in registers


def _validate(x, weight, bias, eps, residual) -> None:
    """Raise TypeError/ValueError naming the argument; the same checks on every backend."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"layer_norm: x must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"layer_norm: x must be float32, float16, bfloat16 or float64; got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"layer_norm: x must have shape (..., N) with N >= 1; got {tuple(x.shape)}")
    n = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor) or p.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"layer_norm: {name} must be a float tensor or None; got "
                            f"{p.dtype if isinstance(p, torch.Tensor) else type(p).__name__}")
        if tuple(p.shape) != (n,):
            raise ValueError(f"layer_norm: {name} must have shape ({n},) (x's last dim); got {tuple(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"layer_norm: {name} is on {p.device}, x is on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"layer_norm: eps must be a finite float >= 0; got {eps!r}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"layer_norm: residual must be a torch.Tensor or None; got {type(residual).__name__}")
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"layer_norm: residual must have x's shape {tuple(x.shape)}, dtype {x.dtype} and "
                             f"device {x.device}; got {tuple(residual.shape)}, {residual.dtype}, {residual.device}")


def _ref(x, weight, bias, eps, residual):
    s = x if residual is None else x + residual
    y = F.layer_norm(s, (x.shape[-1],), weight, bias, eps)
    return y if residual is None else (y, s)


def _kernels() -> ModuleType:
    return _backend.triton_module("layer_norm")


def _use_fused(x, weight, bias, residual) -> bool:
    if torch.compiler.is_compiling() or x.numel() == 0 or x.shape[-1] > MAX_FUSED_N or x.stride(-1) != 1:
        return False
    if residual is not None and residual.stride(-1) != 1:
        return False
    return _backend.use_triton(x, _FUSED_DTYPES, (x, weight, bias, residual))


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   eps: float = 1e-5, residual: torch.Tensor | None = None):
    """The definition of :func:`layer_norm`: torch's add, then torch's layer_norm."""
    _validate(x, weight, bias, eps, residual)
    return _ref(x, weight, bias, eps, residual)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5, residual: torch.Tensor | None = None):
    """LayerNorm over x's last dim; with ``residual``, of x + residual, returned too.

    Args:
        x: (..., N), float32, float16, bfloat16 or float64; any strides.
        weight, bias: the per-feature gain and shift, (N,) on x's device, or None (1 and 0).
        eps: added to the variance; finite and >= 0.
        residual: None, or a tensor of x's shape, dtype and device added to x first.

    Returns:
        y of x's shape and dtype (contiguous); with ``residual``, the pair (y, x + residual).
    """
    _validate(x, weight, bias, eps, residual)
    if _use_fused(x, weight, bias, residual):
        return _kernels().launch(x, weight, bias, float(eps), residual)
    return _ref(x, weight, bias, eps, residual)
