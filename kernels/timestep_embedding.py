"""Sinusoidal timestep embedding, as diffusion models feed the timestep t to their network.

With half = dim // 2 frequencies, for j = 0 .. half-1:

    omega_j = exp(-ln(max_period) * j / (half - downscale_freq_shift))
    a_j     = scale * t * omega_j
    emb     = [sin(a_0..a_{half-1}), cos(a_0..a_{half-1})]   ([cos, sin] with flip_sin_to_cos)

and, for odd dim, one zero column appended. The frequencies run geometrically from 1 towards
1/max_period. This is the Transformer's position encoding (Vaswani et al. 2017,
arXiv:1706.03762, Sec. 3.5) used for the diffusion time by DDPM (Ho et al. 2020, Appendix B);
downscale_freq_shift=1 is the spacing of DDPM's code, 0 (with cos first) that of improved
DDPM/ADM. It reproduces diffusers.models.embeddings.get_timestep_embedding value for value,
the same float32 operations in the same order.

Precision: float32 throughout, as in diffusers, whatever the timesteps' dtype: timesteps
beyond 2^24 lose integer precision, and sin/cos of large angles a_j carry the absolute
rounding error of a_j (about |a_j| * 6e-8).

Limits: timesteps is 1-D (N,), of any real dtype (integer or floating; not bool or complex);
dim >= 1. half - downscale_freq_shift must not be 0 when half >= 1 (it divides the
exponent; diffusers would return NaN there); with dim = 1 there are no frequencies and the
embedding is one zero column. max_period > 0. Gradients flow to floating timesteps through
plain torch ops.

Dispatch (DESIGN.md, decision 2): the Triton kernel of ``timestep_embedding_triton.py`` (one
launch) runs on CUDA tensors (and, with ``FUSEDIFF_KERNELS=fused`` and ``TRITON_INTERPRET=1``, on
CPU tensors) of the dtypes it loads. On CUDA it repeats PyTorch's float32 operations and math
functions, so it should give diffusers' values bit for bit (test_timestep_embedding_cuda.py
checks); in the interpreter numpy's exp/sin/cos differ from PyTorch's in the last bit. Empty
timesteps, other dtypes and calls that need gradients run the reference.
Under ``torch.compile`` the kernel is reached through the custom op
``torch.ops.fusediff.timestep_embedding``.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch

from . import _backend
from ._backend import _have_triton, _interpreting  # noqa: F401  (the tests read them here)

# timestep dtypes the kernel loads and converts (the rest, e.g. uint16 or float8, run the reference)
_FUSED_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
                 torch.float32, torch.float64)


def _is_real(value) -> bool:
    """A Python int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period) -> None:
    """Raise TypeError/ValueError naming the argument; the same checks on every backend."""
    if not isinstance(timesteps, torch.Tensor):
        raise TypeError(f"timestep_embedding: timesteps must be a torch.Tensor; got {type(timesteps).__name__}")
    if timesteps.dtype == torch.bool or timesteps.is_complex():
        raise TypeError(f"timestep_embedding: timesteps must be an integer or floating tensor; got {timesteps.dtype}")
    if timesteps.dim() != 1:
        raise ValueError(
            f"timestep_embedding: timesteps must be 1-D of shape (N,); got shape {tuple(timesteps.shape)}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"timestep_embedding: dim must be an int; got {type(dim).__name__}")
    if dim < 1:
        raise ValueError(f"timestep_embedding: dim must be >= 1; got {dim}")
    if not isinstance(flip_sin_to_cos, bool):
        raise TypeError(f"timestep_embedding: flip_sin_to_cos must be a bool; got {type(flip_sin_to_cos).__name__}")
    for name, value in (("downscale_freq_shift", downscale_freq_shift), ("scale", scale),
                        ("max_period", max_period)):
        if not _is_real(value):
            raise TypeError(f"timestep_embedding: {name} must be a float; got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"timestep_embedding: {name} must be finite; got {value}")
    if max_period <= 0:
        raise ValueError(f"timestep_embedding: max_period must be > 0; got {max_period}")
    half = dim // 2
    if half >= 1 and half - downscale_freq_shift == 0:
        raise ValueError(
            f"timestep_embedding: dim // 2 - downscale_freq_shift must not be 0 (it divides the exponent); "
            f"got dim={dim}, downscale_freq_shift={downscale_freq_shift}")


def _ref(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period):
    """timestep_embedding_ref on inputs already validated."""
    half = dim // 2
    j = torch.arange(half, dtype=torch.float32, device=timesteps.device)  # (half,)
    omega = torch.exp(-math.log(max_period) * j / (half - downscale_freq_shift))  # (half,) frequencies
    angles = scale * (timesteps.float()[:, None] * omega[None, :])  # (N, half)
    sin, cos = torch.sin(angles), torch.cos(angles)
    parts = [cos, sin] if flip_sin_to_cos else [sin, cos]
    if dim % 2 == 1:
        parts.append(angles.new_zeros(angles.shape[0], 1))  # (N, 1) zero column for odd dim
    return torch.cat(parts, dim=-1)  # (N, dim)


def timestep_embedding_ref(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1.0, scale: float = 1.0,
                           max_period: int = 10000) -> torch.Tensor:
    """The definition of :func:`timestep_embedding` in PyTorch: diffusers' float32 arithmetic."""
    _validate(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period)
    return _ref(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period)


def _kernels() -> ModuleType:
    return _backend.triton_module("timestep_embedding")


def _use_fused(x: torch.Tensor, tensors) -> bool:
    """Whether this call runs the Triton kernel: DESIGN.md decision 2, no autograd."""
    return _backend.use_triton(x, _FUSED_DTYPES, tensors)


@torch.library.custom_op("fusediff::timestep_embedding", mutates_args=(), device_types=("cpu", "cuda"))
def timestep_embedding_op(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, downscale_freq_shift: float,
                          scale: float, max_period: float) -> torch.Tensor:
    """The Triton sinusoid as a custom op; arguments as :func:`timestep_embedding` validates them."""
    if timesteps.shape[0] == 0:
        return timesteps.new_empty((0, dim), dtype=torch.float32)
    return _kernels().launch(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period)


@timestep_embedding_op.register_fake
def _(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period):
    return timesteps.new_empty((timesteps.shape[0], dim), dtype=torch.float32)


def _fused(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period):
    args = (timesteps, dim, flip_sin_to_cos, float(downscale_freq_shift), float(scale), float(max_period))
    if torch.compiler.is_compiling():
        return torch.ops.fusediff.timestep_embedding(*args)
    return _kernels().launch(*args)


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, scale: float = 1.0,
                       max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of N timesteps into (N, dim) float32, as diffusers computes it.

    Args:
        timesteps: t, a 1-D tensor (N,) of integer or (fractional) floating timesteps.
        dim: width of the embedding, >= 1; an odd dim gets a zero last column.
        flip_sin_to_cos: put the cos half first (ADM, Stable Diffusion) instead of sin first.
        downscale_freq_shift: s in the frequency spacing omega_j = max_period^(-j / (half - s)),
            half = dim // 2; 1 for DDPM, 0 for ADM. half - s must not be 0.
        scale: multiplies the angles t * omega_j.
        max_period: sets the lowest frequency, about 1/max_period (the highest is 1); > 0.

    Returns:
        emb of shape (N, dim), float32, on timesteps' device.
    """
    _validate(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period)
    if timesteps.shape[0] and _use_fused(timesteps, (timesteps,)):
        return _fused(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period)
    return _ref(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period)
