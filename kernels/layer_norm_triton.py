"""Triton forward of :func:`fusediff.kernels.layer_norm`: (x + residual) and its LayerNorm in one launch.

x (and residual) are viewed as (M, N) rows with unit column stride. Each program takes BLOCK_M rows,
whole (BLOCK_N >= N, a power of two), so a row's statistics are reduced in registers:

    s    = x + r                 float32 sum rounded to x's dtype (torch's add), stored when HAS_R
    mean = sum(s) / N            pass 1
    var  = sum((s - mean)^2) / N pass 2 (biased, as LayerNorm), never E[s^2] - E[s]^2
    y    = (s - mean) * rsqrt(var + eps) * w + b, rounded once to x's dtype

Ba et al. 2016 (arXiv:1607.06450), Sec. 3. Limits: float32, float16, bfloat16; N <= 8192 (the
caller checks); row offsets are 64-bit. Forward only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import CachedKernel, cdiv, next_power_of_2

ROW_TILE = 8192  # elements of x one program holds (s, the centred values and y: fp32 tiles)


@triton.jit
def _layer_norm_kernel(
    X,  # input (M, N), column stride 1
    R,  # residual (M, N) in x's dtype, column stride 1; read when HAS_R
    S,  # out (M, N): x + r in x's dtype, written when HAS_R
    Y,  # out (M, N): the norm, x's dtype
    W,  # weight (N,), read when HAS_W
    Bias,  # bias (N,), read when HAS_B
    M, N,  # rows, features per row
    stride_x, stride_r, stride_s, stride_y,  # element strides between rows
    stride_w, stride_bias,  # element strides of weight and bias
    eps,  # added to the variance
    HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # >= N, a power of two
):
    tl.static_assert(BLOCK_M * BLOCK_N <= 8192, "a program's rows must fit in registers")
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]  # (BLOCK_M, BLOCK_N)
    r64 = rows.to(tl.int64)[:, None]
    s = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_R:
        r = tl.load(R + r64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s_low = (s + r).to(S.dtype.element_ty)  # the sum as torch's add rounds it
        tl.store(S + r64 * stride_s + cols[None, :], s_low, mask=mask)
        s = s_low.to(tl.float32)
    # 1. mean, then 2. the variance of the centred values
    mean = tl.sum(s, axis=1) / N  # (BLOCK_M,)
    d = tl.where(mask, s - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(d * d, axis=1) / N + eps)
    y = d * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols * stride_w, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(Bias + cols * stride_bias, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


# launched through CachedKernel: Triton's launch path once per variant, then its compiled kernel directly
_LAYER_NORM = CachedKernel(_layer_norm_kernel)


def launch(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
           residual: torch.Tensor | None = None):
    """y = layer_norm(x) (or (y, x + residual)) by ``_layer_norm_kernel``; arguments validated, non-empty,
    N <= ROW_TILE, unit last-dim stride. y (and the sum) are new contiguous tensors of x's shape."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)  # (M, N): a view when the leading dims collapse, else one copy
    m = rows.shape[0]
    res = residual.reshape(-1, n) if residual is not None else rows
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous: rows N apart
    s = torch.empty_like(y) if residual is not None else y  # a placeholder pointer without a residual
    w = weight if weight is not None else rows
    b = bias if bias is not None else rows
    block_n = next_power_of_2(n)
    block_m = max(1, min(ROW_TILE // block_n, next_power_of_2(m), 16))
    warps = 8 if block_m * block_n >= 4096 else (4 if block_m * block_n >= 1024 else 2)
    _LAYER_NORM.launch(
        (cdiv(m, block_m),),
        (rows, res, s, y, w, b, m, n, rows.stride(0), res.stride(0), n, n,
         w.stride(0) if weight is not None else 0, b.stride(0) if bias is not None else 0, eps),
        dict(HAS_R=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_M=block_m,
             BLOCK_N=block_n, num_warps=warps))
    return y if residual is None else (y, s)
