"""Triton forward of :func:`fusediff.kernels.geglu`: y = h * GELU(gate) from x = [h, gate] in one launch.

x is viewed as (M, 2F) rows (leading dims collapsed) with unit column stride; for each row m and
column j < F (Shazeer 2020, arXiv:2002.05202, GEGLU; GELU from Hendrycks & Gimpel 2016,
arXiv:1606.08415):

    h = x[m, j],  g = x[m, F + j]                                    loaded once, converted to fp32
    GELU(g) = g * 0.5 * (1 + erf(g * 1/sqrt(2)))                      approximate="none"
    GELU(g) = 0.5 * g * (1 + tanh(sqrt(2/pi) * (g + 0.044715 g^3)))  approximate="tanh"
    y[m, j] = h * GELU(g)                                             rounded once to x's dtype

The float32 operations are those of ATen's CUDA GELU kernel (GeluCUDAKernelImpl) in the same
order, with libdevice's erf and tanh (__nv_erff, __nv_tanhf: CUDA's erff and tanhf, which that
kernel calls), subnormals kept; there is no rounding of GELU(g) to x's dtype before the product
(eager PyTorch in half precision has one, the reference does not). In the interpreter Triton's
tl.math.erf (Python's math.erf) stands in for erf, and tanh(u) = sign(u) (1 - e) / (1 + e) with
e = exp(-2|u|) (numpy's exp), within a few float32 ulps of 1 of tanh: enough for GELU, whose
factor 1 + tanh it is; and the interpreter's float32 -> bfloat16 cast truncates (on CUDA it
rounds to nearest).

Each program of ``_geglu_kernel`` takes BLOCK_M rows by BLOCK_N columns of y; a 1-D grid walks
the column blocks of a row block first, so there is no limit on the number of blocks. Loads of h,
gate and the store of y are contiguous along columns: Triton vectorises them (16 bytes per
thread) when F and the row stride are multiples of 8 fp16 elements, as in every diffusion UNet.

Limits: x float16, bfloat16 or float32, last-dim stride 1, 2F < 2^31; row offsets are 64-bit.
Forward only. ``launch`` makes x a (M, 2F) view with ``reshape``, which copies once when the
leading dims do not collapse to one row stride.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._launch import CachedKernel, cdiv, next_power_of_2
from .timestep_embedding_triton import math_options

MAX_TILE = 4096  # elements of y one program writes (h, gate, y: three fp32 tiles live)
MAX_BLOCK_N = 256  # columns per program: divides SD's F = 1280, 2560, 5120 with no masked lanes
SQRT1_2 = 1.0 / math.sqrt(2.0)  # ATen's kAlpha = M_SQRT1_2
TANH_BETA = math.sqrt(2.0) * (2.0 / math.sqrt(math.pi)) * 0.5  # ATen's kBeta = M_SQRT2 * M_2_SQRTPI * 0.5
TANH_KAPPA = 0.044715  # ATen's kKappa


@triton.jit
def _tanh(u, LIBDEVICE: tl.constexpr):
    """tanh(u) in float32: libdevice's on CUDA; sign(u) (1 - e) / (1 + e), e = exp(-2|u|), in the
    interpreter (which has no libdevice; e in (0, 1] never overflows)."""
    if LIBDEVICE:
        t = libdevice.tanh(u)
    else:
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(u < 0, -t, t)
    return t


@triton.jit
def _erf(u, LIBDEVICE: tl.constexpr):
    """erf(u) in float32: libdevice's (__nv_erff, as ATen) on CUDA, tl.math.erf in the interpreter."""
    if LIBDEVICE:
        e = libdevice.erf(u)
    else:
        e = tl.math.erf(u)
    return e


@triton.jit
def _geglu_kernel(
    X,  # input (M, 2F) of float16/bfloat16/float32: h in columns [0, F), gate in [F, 2F); column stride 1
    Y,  # output (M, F) of X's dtype, column stride 1
    M,  # rows: the product of x's leading dims
    F,  # columns of Y: half of x's last dim
    stride_xm,  # element stride between rows of X (any, >= 0)
    stride_ym,  # element stride between rows of Y
    blocks_n,  # column blocks per row block: cdiv(F, BLOCK_N)
    SQRT1_2: tl.constexpr,  # 1 / sqrt(2), erf's argument scale
    TANH_BETA: tl.constexpr,  # sqrt(2 / pi), tanh's argument scale
    TANH_KAPPA: tl.constexpr,  # 0.044715, the cubic term's coefficient
    APPROX_TANH: tl.constexpr,  # approximate="tanh": the tanh form of GELU instead of erf
    LIBDEVICE: tl.constexpr,  # libdevice erf/tanh (CUDA); tl.math.erf / exp in the interpreter
    BLOCK_M: tl.constexpr,  # rows per program, a power of two
    BLOCK_N: tl.constexpr,  # columns per program, a power of two
):
    tl.static_assert(BLOCK_M * BLOCK_N <= 16384, "tile too large for registers: three fp32 values per element")
    pid = tl.program_id(0)
    pid_m = pid // blocks_n  # block of rows
    pid_n = pid % blocks_n  # block of columns, the fastest-varying
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    mask = (rows < M)[:, None] & (cols < F)[None, :]  # (BLOCK_M, BLOCK_N)
    x_row = X + rows.to(tl.int64)[:, None] * stride_xm  # (BLOCK_M, 1) pointers to each row
    h = tl.load(x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_N)
    g = tl.load(x_row + (F + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
    if APPROX_TANH:  # ATen: 0.5 * x * (1 + tanh(kBeta * (x + kKappa * x^3)))
        g_cube = g * g * g
        inner = TANH_BETA * (g + TANH_KAPPA * g_cube)
        act = 0.5 * g * (1.0 + _tanh(inner, LIBDEVICE))
    else:  # ATen: x * 0.5 * (1 + erf(x * kAlpha))
        act = g * 0.5 * (1.0 + _erf(g * SQRT1_2, LIBDEVICE))
    y = h * act
    y_ptrs = Y + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=mask)


def config(m: int, f: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for M rows of F output columns: whole rows up to MAX_BLOCK_N
    columns, then as many rows as make a MAX_TILE tile, 4 warps for a full tile."""
    block_n = min(next_power_of_2(max(f, 1)), MAX_BLOCK_N)
    block_m = min(next_power_of_2(max(m, 1)), max(1, MAX_TILE // block_n))
    tile = block_m * block_n
    warps = 4 if tile >= 2048 else (2 if tile >= 512 else 1)
    return block_m, block_n, warps


# launched through CachedKernel: Triton's launch path once per variant, then its compiled kernel directly
_GEGLU = CachedKernel(_geglu_kernel)


def launch(x: torch.Tensor, approximate: str, out: torch.Tensor | None = None,
           block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """y = h * GELU(gate) of shape (..., F) in x's dtype by ``_geglu_kernel``, one launch.

    x: (..., 2F), validated, non-empty, last-dim stride 1. ``out`` (contiguous, x.shape[:-1] + (F,), x's
    dtype) receives y if given. ``block_m``, ``block_n`` and ``num_warps`` override :func:`config`
    (powers of two; for benchmarks).
    """
    two_f = x.shape[-1]
    f = two_f // 2
    rows = x.reshape(-1, two_f)  # (M, 2F): a view when the leading dims collapse, else one copy
    if rows.stride(-1) != 1:
        raise ValueError(f"geglu (Triton): x's last dim must have stride 1; got strides {tuple(x.stride())}")
    m = rows.shape[0]
    if out is None:
        out = torch.empty((*x.shape[:-1], f), dtype=x.dtype, device=x.device)
    y = out.view(m, f)  # (M, F)
    bm, bn, warps = config(m, f)
    bm, bn, warps = block_m or bm, block_n or bn, num_warps or warps
    blocks_n = cdiv(f, bn)
    grid = (cdiv(m, bm) * blocks_n,)
    _GEGLU.launch(
        grid,
        (rows, y, m, f, rows.stride(0), y.stride(0), blocks_n),
        dict(SQRT1_2=SQRT1_2, TANH_BETA=TANH_BETA, TANH_KAPPA=TANH_KAPPA, APPROX_TANH=approximate == "tanh",
             BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, **math_options(x.device)))
    return out
