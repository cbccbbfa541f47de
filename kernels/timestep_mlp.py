"""The time embedding of diffusion UNets in one op: the sinusoid of t, then the two-layer SiLU MLP.

    emb = timestep_embedding(t, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period)  (N, dim) fp32
    h   = silu(emb.to(w1.dtype) @ w1^T + b1)                                               (N, hidden)
    out = h @ w2^T + b2                                                                     (N, out_features)

DDPM's network embeds t this way (Ho et al. 2020, arXiv:2006.11239, Appendix B and its released
code: get_timestep_embedding, dense, swish, dense); in diffusers it is ``Timesteps`` followed by
``TimestepEmbedding(act_fn="silu")``, with UNet2DModel's cast of the embedding to the model's
dtype in between. The weights are in nn.Linear's (out, in) layout, so a module's
``linear_1.weight`` and ``linear_2.weight`` pass as they are.

Precision: the reference is that module path op for op: the float32 sinusoid rounded to the
weights' dtype, F.linear, F.silu, F.linear, so PyTorch rounds h to the weights' dtype after
linear_1 and again after the SiLU. The fused kernels accumulate both products in float32 and
round h once, before linear_2, and the output once.

Limits: timesteps and the sinusoid's arguments as for :func:`timestep_embedding`; w1 of shape
(hidden, dim), w2 (out_features, hidden), b1 (hidden,) and b2 (out_features,) or None; all four
of one dtype (float32, float16, bfloat16 or float64) on timesteps' device. Gradients flow
through plain torch ops.

Dispatch (DESIGN.md, decision 2): the Triton kernels of ``timestep_mlp_triton.py`` (one launch
for few timesteps and a small linear_1, else two) run on CUDA tensors (and, with
``FUSEDIFF_KERNELS=fused`` and ``TRITON_INTERPRET=1``, on CPU tensors) with float32, float16 or
bfloat16 weights; float64, empty sizes, autocast and calls that need gradients run the reference.
:func:`timestep_mlp_runs_fused` tells a caller in advance (the UNet keeps its module path
otherwise). Under ``torch.compile`` the kernels are reached through ``torch.ops.fusediff.timestep_mlp``.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from . import _backend
from ._backend import _have_triton, _interpreting  # noqa: F401  (the tests read them here)
from .timestep_embedding import _FUSED_DTYPES as _TIMESTEP_DTYPES
from .timestep_embedding import _ref as _embedding_ref
from .timestep_embedding import _validate as _validate_embedding

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_DTYPES = _FUSED_DTYPES + (torch.float64,)


def _validate(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period, w1, b1, w2, b2) -> None:
    """Raise TypeError/ValueError naming the argument; the same checks on every backend."""
    try:
        _validate_embedding(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period)
    except (TypeError, ValueError) as err:
        raise type(err)(str(err).replace("timestep_embedding:", "timestep_mlp:", 1)) from None
    for name, w in (("w1", w1), ("w2", w2)):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"timestep_mlp: {name} must be a torch.Tensor; got {type(w).__name__}")
        if w.dim() != 2:
            raise ValueError(f"timestep_mlp: {name} must be 2-D (out, in) as nn.Linear.weight; got shape "
                             f"{tuple(w.shape)}")
    if w1.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"timestep_mlp: w1 must be float32, float16, bfloat16 or float64; got {w1.dtype}")
    hidden, out_features = w1.shape[0], w2.shape[0]
    if w1.shape[1] != dim:
        raise ValueError(f"timestep_mlp: w1 must have shape (hidden, dim={dim}); got {tuple(w1.shape)}")
    if w2.shape[1] != hidden:
        raise ValueError(f"timestep_mlp: w2 must have shape (out_features, hidden={hidden}) (w1 has {hidden} rows); "
                         f"got {tuple(w2.shape)}")
    for name, b, size in (("b1", b1, hidden), ("b2", b2, out_features)):
        if b is None:
            continue
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"timestep_mlp: {name} must be a torch.Tensor or None; got {type(b).__name__}")
        if b.shape != (size,):
            raise ValueError(f"timestep_mlp: {name} must have shape ({size},); got {tuple(b.shape)}")
    device = timesteps.device
    for name, p in (("w1", w1), ("w2", w2), ("b1", b1), ("b2", b2)):
        if p is None:
            continue
        if p.dtype != w1.dtype:
            raise ValueError(f"timestep_mlp: {name} is {p.dtype}, w1 is {w1.dtype}; the weights must share a dtype")
        if p.device != device:
            raise ValueError(f"timestep_mlp: {name} is on {p.device}, timesteps are on {device}")


def _ref(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period, w1, b1, w2, b2):
    """timestep_mlp_ref on inputs already validated: UNet2DModel's module path, op for op."""
    emb = _embedding_ref(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period)  # (N, dim) fp32
    h = F.silu(F.linear(emb.to(w1.dtype), w1, b1))  # (N, hidden)
    return F.linear(h, w2, b2)  # (N, out_features)


def timestep_mlp_ref(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, downscale_freq_shift: float,
                     scale: float, max_period: float, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                     b2: torch.Tensor | None) -> torch.Tensor:
    """The definition of :func:`timestep_mlp` in PyTorch: the sinusoid, a cast, Linear, SiLU, Linear."""
    _validate(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period, w1, b1, w2, b2)
    return _ref(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period, w1, b1, w2, b2)


def _kernels() -> ModuleType:
    return _backend.triton_module("timestep_mlp")


def _use_fused(x: torch.Tensor, tensors) -> bool:
    """Whether a call with timesteps ``x`` runs the Triton kernels (weights aside): no autograd, no autocast."""
    # autocast would give linear's output another dtype (asked only of devices the kernels run on)
    return _backend.use_triton(x, _TIMESTEP_DTYPES, tensors) and not torch.is_autocast_enabled(x.device.type)


def timestep_mlp_runs_fused(timesteps: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                            b2: torch.Tensor | None) -> bool:
    """Whether :func:`timestep_mlp` would run the fused kernels for these tensors now (backend, device,
    dtypes, sizes, autograd, autocast); the arguments are not validated."""
    return (timesteps.shape[0] > 0 and w1.dtype in _FUSED_DTYPES and w1.numel() > 0 and w2.numel() > 0
            and _use_fused(timesteps, (timesteps, w1, b1, w2, b2)))


@torch.library.custom_op("fusediff::timestep_mlp", mutates_args=(), device_types=("cpu", "cuda"))
def timestep_mlp_op(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, downscale_freq_shift: float,
                    scale: float, max_period: float, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                    b2: torch.Tensor | None) -> torch.Tensor:
    """The Triton time MLP as a custom op; arguments as :func:`timestep_mlp` validates them."""
    if timesteps.shape[0] == 0 or w1.numel() == 0 or w2.numel() == 0:
        return _ref(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period, w1, b1, w2, b2)
    return _kernels().launch(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period, w1, b1, w2, b2)


@timestep_mlp_op.register_fake
def _(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period, w1, b1, w2, b2):
    return w2.new_empty((timesteps.shape[0], w2.shape[0]))


def timestep_mlp(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, downscale_freq_shift: float,
                 scale: float, max_period: float, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                 b2: torch.Tensor | None) -> torch.Tensor:
    """linear_2(silu(linear_1(timestep_embedding(timesteps, ...).to(w1.dtype)))) in one op.

    Args:
        timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period: the sinusoid,
            as :func:`fusediff.kernels.timestep_embedding` takes them (dim = w1's columns).
        w1, b1: linear_1's weight (hidden, dim) and bias (hidden,) or None.
        w2, b2: linear_2's weight (out_features, hidden) and bias (out_features,) or None; all
            four tensors of one floating dtype, on timesteps' device.

    Returns:
        out of shape (N, out_features) in the weights' dtype.
    """
    args = (timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period, w1, b1, w2, b2)
    _validate(*args)
    if not timestep_mlp_runs_fused(timesteps, w1, b1, w2, b2):
        return _ref(*args)
    args = (timesteps, dim, flip_sin_to_cos, float(downscale_freq_shift), float(scale), float(max_period),
            w1, b1, w2, b2)
    if torch.compiler.is_compiling():
        return torch.ops.fusediff.timestep_mlp(*args)
    return _kernels().launch(*args)
