"""GroupNorm, optionally followed by the SiLU that comes after it in diffusion UNets.

x of shape (B, C, *) is split into G groups of C/G channels; each (batch item, group) pair is
normalised over its C/G channels and all spatial positions, then scaled and shifted per channel:

    mu[b, g]  = mean(x[b, g])                                     pass 1
    var[b, g] = mean((x[b, g] - mu[b, g])^2)                      pass 2 (biased)
    y[b, c]   = (x[b, c] - mu[b, g]) / sqrt(var[b, g] + eps) * weight[c] + bias[c]
    y         = y * sigmoid(y)                                    when activation="silu"

With ``add`` (B, C), x is first replaced by x + add[:, :, None, ...], rounded to x's dtype: the
time-embedding term a diffusion UNet's residual block adds before its second norm. The fused
kernels add it as they read x, so the sum is never written to memory, and round it as torch's
add does, so the result equals, bit for bit, ``group_norm(x + add[:, :, None, None])`` on the
same backend. With gradients the sum is formed by torch and the fused norm runs on it (the
fused backward has no add term).

GroupNorm is Wu & He, "Group Normalization" (ECCV 2018, arXiv:1803.08494), Sec. 3.1, the
normalisation x_hat = (x - mu) / sigma over the set S_i of one sample's channel group, followed
by the per-channel affine gamma * x_hat + beta. SiLU (swish) is x * sigmoid(x) (Elfwing et al.
2018, arXiv:1702.03118); DDPM's UNet (Ho et al. 2020, Appendix B, and its released code)
applies GroupNorm then swish at the head of every residual block, which is why the two are one
op here. Without an activation the result is torch.nn.functional.group_norm.

Precision: mean, variance, affine and activation in float32 (float64 for float64 input); the
variance in two passes, never E[x^2] - E[x]^2, which cancels catastrophically when |mean| is
large against the spread; one rounding to x's dtype at the end.

Layout: any strides are accepted. The output has x's memory format when x is channels-last
(4-D) or channels-last-3d (5-D), as torch's group_norm does, and is contiguous otherwise.

Limits: x is float32, float16, bfloat16 or float64; weight and bias may have any of those dtypes
(they are upcast). The reference holds float32 copies of x while it runs (a few times x's size).

Dispatch (DESIGN.md, decision 2): the Triton kernels of ``group_norm_triton.py`` run on CUDA
tensors (and, with ``FUSEDIFF_KERNELS=fused`` and ``TRITON_INTERPRET=1``, on CPU tensors) that
are float32, float16 or bfloat16 and contiguous or channels-last; float64, other strides, empty
tensors and batch items of 2^31 elements or more run the reference, whose gradients flow
through plain torch ops.

Gradients on the fused path: when x, weight or bias requires a gradient, :class:`_FusedGroupNorm`
runs the same forward kernels, which also write each group's float32 mean and rstd; it saves x,
mean and rstd (not y) and its backward runs ``group_norm_backward_triton.py`` for dx, dweight
and dbias (each in its input's dtype). Double backward raises. Under ``torch.compile`` the
kernels are reached through custom ops: ``torch.ops.fusediff.group_norm`` (inference), and
``fusediff::group_norm_fwd`` (y, mean, rstd) with ``fusediff::group_norm_bwd`` as its autograd
formula, so a compiled training step traces in one graph.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _backend
from ._backend import _have_triton, _interpreting  # noqa: F401  (the tests read them here)

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_DTYPES = _FUSED_DTYPES + (torch.float64,)


_FLOAT_SET = frozenset(_FLOAT_DTYPES)
_INF = float("inf")


def _add_ok(add, x) -> bool:
    return add is None or (isinstance(add, torch.Tensor) and add.dtype == x.dtype and add.dim() == 2
                           and add.shape[0] == x.shape[0] and add.shape[1] == x.shape[1] and add.device == x.device)


def _param_ok(p, channels: int, device) -> bool:
    return p is None or (isinstance(p, torch.Tensor) and p.dtype in _FLOAT_SET and p.dim() == 1
                         and p.shape[0] == channels and p.device == device)


def _valid(x, num_groups, weight, bias, eps, activation, add=None) -> bool:
    """The common case of :func:`_validate` in a few checks: True only where every check there passes."""
    if not (isinstance(x, torch.Tensor) and type(num_groups) is int and type(eps) is float and 0.0 <= eps < _INF
            and (activation is None or (type(activation) is str and activation == "silu"))):
        return False
    if not (x.dtype in _FLOAT_SET and x.dim() >= 2 and num_groups > 0 and x.shape[1] % num_groups == 0):
        return False
    return _param_ok(weight, x.shape[1], x.device) and _param_ok(bias, x.shape[1], x.device) and _add_ok(add, x)


def _validate(x, num_groups, weight, bias, eps, activation, add=None) -> None:
    """Raise TypeError/ValueError naming the argument; the same checks on every backend."""
    if _valid(x, num_groups, weight, bias, eps, activation, add):
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"group_norm: x must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"group_norm: x must be float32, float16, bfloat16 or float64; got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"group_norm: x must have shape (B, C, *), at least 2-D; got shape {tuple(x.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"group_norm: num_groups must be an int; got {type(num_groups).__name__}")
    channels = x.shape[1]
    if num_groups <= 0 or channels % num_groups != 0:
        raise ValueError(
            f"group_norm: num_groups must be a positive divisor of x's C={channels} channels; got {num_groups}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"group_norm: {name} must be a torch.Tensor or None; got {type(p).__name__}")
        if p.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"group_norm: {name} must be float32, float16, bfloat16 or float64; got {p.dtype}")
        if p.shape != (channels,):
            raise ValueError(f"group_norm: {name} must have shape ({channels},) (x's C); got {tuple(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"group_norm: {name} is on {p.device}, x is on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"group_norm: eps must be a float; got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"group_norm: eps must be finite and >= 0; got {eps}")
    if activation is not None and (not isinstance(activation, str) or activation != "silu"):
        raise ValueError(f"group_norm: activation must be None or 'silu'; got {activation!r}")
    if add is not None:
        if not isinstance(add, torch.Tensor):
            raise TypeError(f"group_norm: add must be a torch.Tensor or None; got {type(add).__name__}")
        if add.dtype != x.dtype:
            raise TypeError(f"group_norm: add must have x's dtype {x.dtype}; got {add.dtype}")
        if tuple(add.shape) != tuple(x.shape[:2]):
            raise ValueError(f"group_norm: add must have shape {tuple(x.shape[:2])} (x's B, C); got {tuple(add.shape)}")
        if add.device != x.device:
            raise ValueError(f"group_norm: add is on {add.device}, x is on {x.device}")


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format the output keeps: x's when channels-last (3d), contiguous otherwise."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _plus(x: torch.Tensor, add: torch.Tensor | None) -> torch.Tensor:
    """x + add[:, :, None, ...] in x's dtype (torch's rounding), in x's memory format; x itself without add."""
    if add is None:
        return x
    return (x + add.reshape(add.shape + (1,) * (x.dim() - 2))).contiguous(memory_format=_memory_format(x))


def _ref(x, num_groups, weight, bias, eps, activation, add=None):
    """group_norm_ref on inputs already validated."""
    x = _plus(x, add)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    batch, channels = x.shape[0], x.shape[1]
    group_size = channels // num_groups * x.shape[2:].numel()  # elements per (b, g): C/G * spatial
    xg = x.to(compute).reshape(batch, num_groups, group_size)  # (B, G, C/G * S)
    mean = xg.mean(dim=-1, keepdim=True)  # (B, G, 1), pass 1
    centred = xg - mean
    var = centred.square().mean(dim=-1, keepdim=True)  # (B, G, 1), pass 2: biased variance
    y = (centred * torch.rsqrt(var + eps)).reshape(x.shape)  # (B, C, *)
    per_channel = (1, channels) + (1,) * (x.dim() - 2)  # broadcast (C,) over batch and space
    if weight is not None:
        y = y * weight.to(compute).reshape(per_channel)
    if bias is not None:
        y = y + bias.to(compute).reshape(per_channel)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype, memory_format=_memory_format(x))


def _kernels() -> ModuleType:
    return _backend.triton_module("group_norm")


def _backward_kernels() -> ModuleType:
    return _backend.triton_module("group_norm_backward")


def _use_fused(x: torch.Tensor, tensors) -> bool:
    """Whether this call runs the Triton kernels (layout aside): DESIGN.md decision 2, autograd included."""
    return _backend.use_triton(x, _FUSED_DTYPES, tensors, backward=True)


def _channels_last(x: torch.Tensor) -> bool | None:
    """False for a contiguous x, True for a dense channels-last one, None for other strides."""
    if x.is_contiguous():
        return False
    if _memory_format(x) is not torch.contiguous_format:
        return True
    return None


def _fused(x, num_groups, weight, bias, eps, activation, channels_last, add=None):
    if torch.compiler.is_compiling():
        return torch.ops.fusediff.group_norm(x, num_groups, weight, bias, float(eps), activation == "silu", add)
    return _kernels().launch(x, num_groups, weight, bias, float(eps), activation == "silu", channels_last, add=add)


def _dense_layout(x: torch.Tensor, op: str) -> bool:
    """x's channels_last flag for the kernels, which index x as (B, C, S) in one of the two layouts."""
    channels_last = _channels_last(x)
    if channels_last is None:
        raise ValueError(f"fusediff::{op}: x must be contiguous or channels-last; got strides {x.stride()}")
    return channels_last


def _group_norm_fake(x, num_groups, weight, bias, eps, silu, add=None):
    return torch.empty_like(x)


@_backend.kernel_op("fusediff::group_norm", _group_norm_fake)
def group_norm_op(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  eps: float, silu: bool, add: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton GroupNorm(+SiLU) forward as a custom op; x contiguous or channels-last; ``add`` (B, C)."""
    channels_last = _dense_layout(x, "group_norm")
    if x.numel() == 0:
        return torch.empty_like(x)
    return _kernels().launch(x, num_groups, weight, bias, eps, silu, channels_last, add=add)


# --- training: the forward that keeps its statistics, the backward kernels, autograd ----------------


def _grads_out(dx, dw, db, weight, bias, needs):
    """(dx, dweight, dbias) as autograd wants them: None where not needed, parameters in their dtypes."""
    return (dx if needs[0] else None,
            dw.to(weight.dtype) if needs[1] and weight is not None else None,
            db.to(bias.dtype) if needs[2] and bias is not None else None)


class _FusedGroupNorm(torch.autograd.Function):
    """Eager training path: the Triton forward (saving x, mean, rstd) and the Triton backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, silu, channels_last):
        y, mean, rstd = _kernels().launch(x, num_groups, weight, bias, eps, silu, channels_last, return_stats=True)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.silu, ctx.channels_last = num_groups, silu, channels_last
        return y

    @staticmethod
    @once_differentiable  # double backward raises a clear error
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = _backward_kernels().launch_backward(dy, x, mean, rstd, weight, bias, ctx.num_groups, ctx.silu,
                                                         ctx.channels_last)
        return (*_grads_out(dx, dw, db, weight, bias, ctx.needs_input_grad), None, None, None, None)


def _group_norm_fwd_fake(x, num_groups, weight, bias, eps, silu):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@_backend.kernel_op("fusediff::group_norm_fwd", _group_norm_fwd_fake)
def group_norm_fwd_op(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      eps: float, silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton forward for training: y, and each group's float32 mean and rstd, (B, G)."""
    channels_last = _dense_layout(x, "group_norm_fwd")
    if x.numel() == 0:
        stats = torch.zeros((x.shape[0], num_groups), dtype=torch.float32, device=x.device)
        return torch.empty_like(x), stats, stats.clone()
    return _kernels().launch(x, num_groups, weight, bias, eps, silu, channels_last, return_stats=True)


def _group_norm_bwd_fake(dy, x, mean, rstd, weight, bias, num_groups, silu):
    dw = x.new_empty((x.shape[1],), dtype=torch.float32)
    return torch.empty_like(x), dw, torch.empty_like(dw)


@_backend.kernel_op("fusediff::group_norm_bwd", _group_norm_bwd_fake)
def group_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                      weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
                      silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton backward: dx (x's dtype and strides), dweight and dbias (float32, (C,))."""
    channels_last = _dense_layout(x, "group_norm_bwd")
    if x.numel() == 0:
        zeros = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
        return torch.zeros_like(x), zeros, zeros.clone()
    return _backward_kernels().launch_backward(dy, x, mean, rstd, weight, bias, num_groups, silu, channels_last)


def _fwd_setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, _eps, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.silu = num_groups, silu


def _fwd_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.fusediff.group_norm_bwd(dy, x, mean, rstd, weight, bias, ctx.num_groups, ctx.silu)
    dx, dw, db = _grads_out(dx, dw, db, weight, bias, (True, True, True))
    return dx, None, dw, db, None, None


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fusediff::group_norm_bwd: double backward of the fused group_norm is not supported; "
                       "use FUSEDIFF_KERNELS=ref for higher-order gradients")


torch.library.register_autograd("fusediff::group_norm_fwd", _fwd_backward, setup_context=_fwd_setup_context)
torch.library.register_autograd("fusediff::group_norm_bwd", _no_double_backward)


def _fused_train(x, num_groups, weight, bias, eps, activation, channels_last):
    silu = activation == "silu"
    if torch.compiler.is_compiling():
        return torch.ops.fusediff.group_norm_fwd(x, num_groups, weight, bias, float(eps), silu)[0]
    return _FusedGroupNorm.apply(x, weight, bias, num_groups, float(eps), silu, channels_last)


def group_norm_ref(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5,
                   activation: str | None = None, add: torch.Tensor | None = None) -> torch.Tensor:
    """The definition of :func:`group_norm` in PyTorch: two-pass fp32 statistics, one final rounding."""
    _validate(x, num_groups, weight, bias, eps, activation, add)
    return _ref(x, num_groups, weight, bias, eps, activation, add)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5,
               activation: str | None = None, add: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm over (B, C, *), then an optional SiLU; torch's group_norm (+ silu) in one op.

    Args:
        x: input of shape (B, C, *): batch, channels, then any number of spatial dims (none
            included); float32, float16, bfloat16 or float64; any strides.
        num_groups: G, the number of channel groups; a positive int dividing C.
        weight: per-channel scale gamma of shape (C,) on x's device, or None for 1.
        bias: per-channel shift beta of shape (C,) on x's device, or None for 0.
        eps: added to the variance before the square root; finite and >= 0.
        activation: None, or "silu" to apply y * sigmoid(y) after the affine.
        add: None, or a (B, C) tensor of x's dtype and device added to x per (batch item, channel)
            before the norm (rounded to x's dtype, as ``x + add[:, :, None, None]`` is).

    Returns:
        y of x's shape and dtype; in x's memory format when x is channels-last (3d), else
        contiguous. Differentiable in x, weight and bias (once); on the fused path the backward
        runs Triton kernels too.
    """
    _validate(x, num_groups, weight, bias, eps, activation, add)
    if 0 < x.numel() and x.numel() // x.shape[0] < 2**31 and _use_fused(x, (x, weight, bias, add)):
        channels_last = _channels_last(x)
        if channels_last is not None:
            if _backend.needs_grad((x, weight, bias, add)):
                return _fused_train(_plus(x, add), num_groups, weight, bias, eps, activation, channels_last)
            return _fused(x, num_groups, weight, bias, eps, activation, channels_last, add)
    return _ref(x, num_groups, weight, bias, eps, activation, add)
