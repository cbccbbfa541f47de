"""GEGLU, the GELU-gated linear unit of the transformer feed-forward in latent diffusion UNets.

x of shape (..., 2F) is the output of the feed-forward's first projection; its first half is the
value h and its second half the gate (diffusers' order: ``h, gate = proj(x).chunk(2, dim=-1)``):

    GEGLU(x) = h * GELU(gate)                                              (..., 2F) -> (..., F)
    GELU(g)  = g * Phi(g) = 0.5 * g * (1 + erf(g / sqrt(2)))                approximate="none"
    GELU(g) ~= 0.5 * g * (1 + tanh(sqrt(2/pi) * (g + 0.044715 g^3)))       approximate="tanh"

GEGLU is Shazeer 2020, "GLU Variants Improve Transformer" (arXiv:2002.05202), Eq. 5 (there
without biases); GELU and its tanh approximation are Hendrycks & Gimpel 2016 (arXiv:1606.08415),
Sec. 2. Latent diffusion (Rombach et al. 2022, arXiv:2112.10752, its released code) and diffusers'
``GEGLU`` module use the exact (erf) form. ``approximate`` takes torch.nn.functional.gelu's values.

Precision and rounding: GELU and the product are computed in float32 (float64 for float64 x) and
rounded once to x's dtype. For float32 and float64 x that is PyTorch's ``h * F.gelu(gate)``
exactly. For float16 and bfloat16 x, eager PyTorch computes GELU in float32 too but rounds it to
x's dtype before the product (two roundings); this op rounds the float32 product once, so it
differs from eager PyTorch by at most about one unit in the last place of the result, and the
difference is eager's extra rounding error.

Layout: x may have any strides. The output is a new contiguous tensor of shape x.shape[:-1] + (F,)
and x's dtype.

Limits: x is float16, bfloat16, float32 or float64, at least 1-D, with an even last dim (F = 0 is
allowed and gives an empty result). Gradients flow through plain torch ops (the reference).

Dispatch (DESIGN.md, decision 2): the Triton kernel of ``geglu_triton.py`` (one launch, x read
once) runs on CUDA tensors (and, with ``FUSEDIFF_KERNELS=fused`` and ``TRITON_INTERPRET=1``, on CPU
tensors) that are float16, bfloat16 or float32 with a unit-stride last dim; leading dims that do
not collapse to one row stride are copied once into rows. float64, a strided last dim, empty
tensors, 2F >= 2^31 and calls that need gradients run the reference. Under ``torch.compile`` the
kernel is reached through the custom op ``torch.ops.fusediff.geglu``.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from . import _backend

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_DTYPES = _FUSED_DTYPES + (torch.float64,)
APPROXIMATIONS = ("none", "tanh")


def _validate(x, approximate) -> None:
    """Raise TypeError/ValueError naming the argument; the same checks on every backend."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"geglu: x must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"geglu: x must be float16, bfloat16, float32 or float64; got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("geglu: x must have shape (..., 2F), at least 1-D; got a 0-D tensor")
    if x.shape[-1] % 2:
        raise ValueError(f"geglu: x's last dim must be even, 2F = [h, gate]; got shape {tuple(x.shape)}")
    if not isinstance(approximate, str) or approximate not in APPROXIMATIONS:
        raise ValueError(f"geglu: approximate must be 'none' or 'tanh'; got {approximate!r}")


def _ref(x, approximate):
    """geglu_ref on inputs already validated."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    h, gate = x.to(compute).chunk(2, dim=-1)  # (..., F) each
    y = h * F.gelu(gate, approximate=approximate)  # (..., F) in compute precision
    return y.to(x.dtype, memory_format=torch.contiguous_format)  # the one rounding


def geglu_ref(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """The definition of :func:`geglu` in PyTorch: ``h * F.gelu(gate)`` in float32, one rounding."""
    _validate(x, approximate)
    return _ref(x, approximate)


def _kernels() -> ModuleType:
    return _backend.triton_module("geglu")


def _use_fused(x: torch.Tensor, tensors) -> bool:
    """Whether this call runs the Triton kernel (layout aside): DESIGN.md decision 2, no autograd."""
    return _backend.use_triton(x, _FUSED_DTYPES, tensors)


def _layout_ok(x: torch.Tensor) -> bool:
    """Whether the kernel takes x: non-empty, unit-stride last dim, row offsets of int32 columns."""
    return x.numel() > 0 and x.stride(-1) == 1 and x.shape[-1] < 2**31


def _geglu_fake(x, approximate):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@_backend.kernel_op("fusediff::geglu", _geglu_fake)
def geglu_op(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """The Triton GEGLU forward as a custom op; x's last dim unit-stride (or x empty)."""
    if x.numel() == 0:
        return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))
    if x.stride(-1) != 1:  # the kernel loads rows of x with unit column stride
        raise ValueError(f"fusediff::geglu: x's last dim must have stride 1; got strides {tuple(x.stride())}")
    return _kernels().launch(x, approximate)


def _fused(x, approximate):
    if torch.compiler.is_compiling():
        return torch.ops.fusediff.geglu(x, approximate)
    return _kernels().launch(x, approximate)


def geglu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """h * GELU(gate) for x = [h, gate] along the last dim: diffusers' GEGLU after its projection.

    Args:
        x: (..., 2F), the projection output; h = x[..., :F], gate = x[..., F:]. float16,
            bfloat16, float32 or float64; any strides.
        approximate: "none" for the exact erf GELU (diffusers' GEGLU), "tanh" for the tanh form,
            as in torch.nn.functional.gelu.

    Returns:
        y of shape (..., F) and x's dtype, contiguous; computed in float32 (float64 for float64)
        and rounded once.
    """
    _validate(x, approximate)
    if _layout_ok(x) and _use_fused(x, (x,)):
        return _fused(x, approximate)
    return _ref(x, approximate)
