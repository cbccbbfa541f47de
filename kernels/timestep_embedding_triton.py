"""Triton forward of :func:`fusediff.kernels.timestep_embedding`: the (N, dim) sinusoid in one launch.

For half = dim // 2 frequencies j and timesteps t (DDPM, Ho et al. 2020, Appendix B; the
Transformer's encoding, Vaswani et al. 2017, Sec. 3.5):

    omega_j = exp((-ln(max_period) * j) * inv_den)      inv_den = fp32(1 / fp32(half - shift))
    a_nj    = scale * (t_n * omega_j)
    emb_n   = [sin(a_n.), cos(a_n.)] ([cos, sin] with flip_sin_to_cos), then a zero column for odd dim

Each program of ``_embedding_kernel`` takes BLOCK_M timesteps by BLOCK_J frequencies and writes
both halves (and, in the first column block, the zero column). The float32 operations are those
of the reference (diffusers' get_timestep_embedding) in the same order, as PyTorch runs them on
CUDA: the division by the Python number half - shift is a multiplication by its float32
reciprocal there (ATen's div_true_kernel_cuda), and exp, sin and cos are libdevice's
(__nv_expf, __nv_sinf, __nv_cosf: CUDA's expf, sinf, cosf, which ATen's float kernels call),
with subnormals kept (``enable_reflect_ftz=False``); so on CUDA the kernel should give diffusers'
values bit for bit (test_timestep_embedding_cuda.py checks). Triton's own tl.exp is ex2.approx,
whose error grows with |t * omega|: tl.exp/sin/cos run only in the interpreter, where numpy
evaluates them (differing from PyTorch's CPU functions in the last bit).

The jit helpers ``load_timesteps`` and ``sin_cos`` are shared with timestep_mlp_triton.py.

Limits: timesteps 1-D with any stride, of an integer or floating dtype that Triton loads (int8
to int64, uint8, float16, bfloat16, float32, float64); converted to float32 in the kernel
(integers round to nearest, as torch's .float() does). Forward only. dim < 2^31.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._launch import CachedKernel, cdiv, next_power_of_2

MAX_TILE = 4096  # timesteps x frequencies one program holds (angles, sin and cos: 3 fp32 each)
MAX_BLOCK_J = 256  # frequencies per program


@triton.jit
def load_timesteps(T, stride_t, rows, N):
    """t of ``rows`` (masked beyond N, there 0) converted to float32 in the kernel: (BLOCK_M,)."""
    t = tl.load(T + rows.to(tl.int64) * stride_t, mask=rows < N, other=0)
    return t.to(tl.float32)


@triton.jit
def sin_cos(t, j, half, neg_log, inv_den, scale, LIBDEVICE: tl.constexpr):
    """sin and cos of a = scale * (t * omega_j) for t (BLOCK_M,) and frequencies j (BLOCK_J,) as the
    reference orders them; both (BLOCK_M, BLOCK_J) float32, 0 where j >= half."""
    jf = j.to(tl.float32)
    exponent = neg_log * jf * inv_den  # (BLOCK_J,): (-ln(max_period) * j) / (half - shift)
    if LIBDEVICE:
        omega = libdevice.exp(exponent)
    else:
        omega = tl.exp(exponent)
    a = scale * (t[:, None] * omega[None, :])  # (BLOCK_M, BLOCK_J)
    if LIBDEVICE:
        s = libdevice.sin(a)
        c = libdevice.cos(a)
    else:
        s = tl.sin(a)
        c = tl.cos(a)
    j_ok = (j < half)[None, :]
    return tl.where(j_ok, s, 0.0), tl.where(j_ok, c, 0.0)


@triton.jit
def _embedding_kernel(
    T,  # timesteps (N,), any integer or floating dtype, element stride stride_t
    OUT,  # float32 (N, dim), row stride stride_out, column stride 1
    N,  # number of timesteps
    half,  # frequencies: dim // 2
    dim,  # columns of OUT
    stride_t,  # element stride of T
    stride_out,  # element stride between rows of OUT
    neg_log,  # float32(-ln(max_period))
    inv_den,  # float32(1 / float32(half - downscale_freq_shift)); 0 when half = 0
    scale,  # multiplies the angles
    FLIP: tl.constexpr,  # cos half first
    ODD: tl.constexpr,  # dim is odd: write the zero last column
    LIBDEVICE: tl.constexpr,  # libdevice exp/sin/cos (CUDA); tl.* in the interpreter
    BLOCK_M: tl.constexpr,  # timesteps per program, a power of two
    BLOCK_J: tl.constexpr,  # frequencies per program, a power of two
):
    pid_m = tl.program_id(0)  # block of timesteps
    pid_j = tl.program_id(1)  # block of frequencies
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)  # (BLOCK_J,)
    t = load_timesteps(T, stride_t, rows, N)
    s, c = sin_cos(t, j, half, neg_log, inv_den, scale, LIBDEVICE)
    row_ok = rows < N
    mask = row_ok[:, None] & (j < half)[None, :]
    base = OUT + rows.to(tl.int64)[:, None] * stride_out + j[None, :]  # (BLOCK_M, BLOCK_J) pointers
    if FLIP:
        tl.store(base, c, mask=mask)
        tl.store(base + half, s, mask=mask)
    else:
        tl.store(base, s, mask=mask)
        tl.store(base + half, c, mask=mask)
    if ODD:
        if pid_j == 0:  # the first block of frequencies also writes the zero column
            zero = tl.zeros([BLOCK_M], dtype=tl.float32)
            tl.store(OUT + rows.to(tl.int64) * stride_out + (dim - 1), zero, mask=row_ok)


def _f32(x: float) -> float:
    """x rounded to float32 (overflow to inf), as PyTorch converts a Python scalar for a float32 op."""
    return torch.tensor(x, dtype=torch.float64).float().item()


@functools.lru_cache(maxsize=256)
def constants(dim: int, downscale_freq_shift: float, max_period: float,
              scale: float) -> tuple[int, float, float, float]:
    """(half, neg_log, inv_den, scale) as the float32 values the reference's CUDA ops use."""
    half = dim // 2
    neg_log = _f32(-math.log(max_period))
    inv_den = 0.0
    if half:
        den = torch.tensor(half - downscale_freq_shift, dtype=torch.float64).float()
        inv_den = (torch.ones((), dtype=torch.float32) / den).item()  # ATen: opmath_t(1) / b, then a * inv_b
    return half, neg_log, inv_den, _f32(scale)


@functools.lru_cache(maxsize=None)
def _cuda_math_options() -> dict:
    try:  # enable_reflect_ftz is a CUDA compile option of recent Triton releases
        from triton.backends.nvidia.compiler import CUDAOptions
        no_ftz = {"enable_reflect_ftz": False} if "enable_reflect_ftz" in CUDAOptions.__dataclass_fields__ else {}
    except ImportError:
        no_ftz = {}
    return dict(LIBDEVICE=True, **no_ftz)


def math_options(device: torch.device) -> dict:
    """Kernel arguments that pick the transcendental functions: libdevice without flush-to-zero on CUDA."""
    return _cuda_math_options() if device.type == "cuda" else dict(LIBDEVICE=False)


# launched through CachedKernel: Triton's launch path once per variant, then its compiled kernel directly
_EMBEDDING = CachedKernel(_embedding_kernel)


def launch(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, downscale_freq_shift: float,
           scale: float, max_period: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """emb (N, dim) float32 by ``_embedding_kernel``, one launch; arguments validated, N >= 1.

    ``out`` (float32 (N, dim), unit column stride) receives emb if given.
    """
    n = timesteps.shape[0]
    half, neg_log, inv_den, scale32 = constants(dim, float(downscale_freq_shift), float(max_period), float(scale))
    if out is None:
        out = torch.empty((n, dim), dtype=torch.float32, device=timesteps.device)
    block_j = min(next_power_of_2(max(half, 1)), MAX_BLOCK_J)
    block_m = min(next_power_of_2(n), max(1, MAX_TILE // block_j))
    grid = (cdiv(n, block_m), max(1, cdiv(half, block_j)))
    warps = 4 if block_m * block_j >= 2048 else (2 if block_m * block_j >= 512 else 1)
    _EMBEDDING.launch(
        grid,
        (timesteps, out, n, half, dim, timesteps.stride(0), out.stride(0), neg_log, inv_den, scale32),
        dict(FLIP=bool(flip_sin_to_cos), ODD=dim % 2 == 1, BLOCK_M=block_m, BLOCK_J=block_j, num_warps=warps,
             **math_options(timesteps.device)))
    return out
