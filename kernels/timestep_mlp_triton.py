"""Triton forward of :func:`fusediff.kernels.timestep_mlp`: out = linear_2(silu(linear_1(emb(t)))).

emb(t) is the sinusoid of timestep_embedding_triton.py (same float32 operations, rounded to the
weights' dtype as the UNet rounds it), linear_k(x) = x @ W_k^T + b_k with W_k in nn.Linear's
(out, in) layout, SiLU(x) = x * sigmoid(x). Products accumulate in float32 (tl.dot with
input_precision="ieee" for float32 weights, as PyTorch's default float32 matmul; tensor cores for
float16/bfloat16); the hidden activation h is rounded to the weights' dtype once, before
linear_2; the output once, to the weights' dtype.

emb @ W1^T is computed as sin(A) @ W1[:, sin columns]^T + cos(A) @ W1[:, cos columns]^T over the
angles A (N, half), so every angle gives one sin and one cos; the zero column of an odd dim adds
0 * W1[:, dim - 1] and is skipped (only a non-finite weight there would tell the difference).

Two plans, chosen on the host (``plan="auto"``) or named:
- "one" (ONE launch, ``_mlp_kernel`` with RECOMPUTE): a program owns BLOCK_M rows and BLOCK_O
  output columns. It computes sin and cos of all its rows' angles once (in registers, so
  half <= 512), then for each block of BLOCK_H hidden units h = silu(emb @ W1[hk]^T + b1[hk])
  and acc += h @ W2[o, hk]^T. Every program reads all of W1 (from L2 after the first): right
  when N is small and W1 is at most ONE_LAUNCH_MAX_W1_BYTES.
- "two" (TWO launches): ``_hidden_kernel`` writes h (N, hidden) in the weights' dtype, each
  program one block of rows by hidden units; then ``_mlp_kernel`` without RECOMPUTE reads h
  for acc += h @ W2^T. W1 and W2 are each read once per row block; for large N or W1.
Both plans round the same values the same way, so they agree to float32 summation order.
The "auto" thresholds below are estimates, not measurements: one launch saves a launch's host
cost, two read W1 once; bench_timestep_embedding.py times both ("plan one", "plan two").

Row blocks: tl.dot needs every dimension >= 16, so with float16/bfloat16 weights (or >= 16
rows) rows are padded to BLOCK_M >= 16 and masked; float32 weights with fewer than 16 rows use
a broadcast multiply and sum over BLOCK_M = next_power_of_2(N) rows instead, as bfloat16 does
in the interpreter, whose tl.dot gets bfloat16 wrong.

Limits: forward only; weights float32, float16 or bfloat16, all four tensors of one dtype, any
strides, fewer than 2^31 elements each.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import CachedKernel, cdiv, next_power_of_2
from .timestep_embedding_triton import constants, load_timesteps, math_options, sin_cos

TILE = 8192  # elements of the largest tile a program holds: a tl.dot operand, or a broadcast product
ONE_LAUNCH_MAX_ROWS = 16  # "auto" runs one launch up to this many timesteps ...
ONE_LAUNCH_MAX_HALF = 512  # ... when the sin and cos of every frequency fit in registers ...
ONE_LAUNCH_MAX_W1_BYTES = 1 << 20  # ... and W1, which every program reads, is at most this big
BLOCK_O_ONE = 32  # output columns per program of the one-launch plan: out / 32 programs read W2


@triton.jit
def _mm(a, b, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """a (M, K) @ b (K, N) accumulated in float32: tl.dot, or a broadcast product summed over K."""
    if USE_DOT:
        return tl.dot(a, b, input_precision=PRECISION)
    else:
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)


@triton.jit
def _emb_w1(s, c, W1, hk, j, hidden, half, off_sin, off_cos, stride_w1_h, stride_w1_e,
            USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """emb @ W1[hk]^T over the frequencies j: s (BLOCK_M, BLOCK_J) against W1's sin columns plus c
    against its cos columns; (BLOCK_M, BLOCK_H) float32."""
    mask = (j < half)[:, None] & (hk < hidden)[None, :]  # (BLOCK_J, BLOCK_H)
    w = W1 + hk[None, :] * stride_w1_h + j[:, None] * stride_w1_e  # W1^T[j, hk], the sin or cos column j
    w_sin = tl.load(w + off_sin * stride_w1_e, mask=mask, other=0.0)
    w_cos = tl.load(w + off_cos * stride_w1_e, mask=mask, other=0.0)
    return _mm(s, w_sin, USE_DOT, PRECISION) + _mm(c, w_cos, USE_DOT, PRECISION)


@triton.jit
def _hidden_kernel(
    T,  # timesteps (N,), any integer or floating dtype, element stride stride_t
    W1,  # linear_1.weight (hidden, dim), strides (stride_w1_h, stride_w1_e)
    B1,  # linear_1.bias (hidden,), read when HAS_B1
    H,  # output h = silu(emb @ W1^T + b1), (N, hidden) in W1's dtype, row stride stride_h
    N,  # number of timesteps
    half,  # frequencies: dim // 2
    hidden,  # rows of W1
    off_sin, off_cos,  # first column of the sin and of the cos half of emb (flip_sin_to_cos)
    stride_t, stride_w1_h, stride_w1_e, stride_b1, stride_h,  # element strides
    neg_log, inv_den, scale,  # float32 constants of the sinusoid (timestep_embedding_triton.constants)
    HAS_B1: tl.constexpr,  # linear_1 has a bias
    LIBDEVICE: tl.constexpr,  # libdevice exp/sin/cos (CUDA); tl.* in the interpreter
    USE_DOT: tl.constexpr, PRECISION: tl.constexpr,  # tl.dot (and its input_precision) or a broadcast sum
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr,  # rows, frequencies, hidden units
):
    pid_m = tl.program_id(0)  # block of rows
    pid_h = tl.program_id(1)  # block of hidden units
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    hk = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # (BLOCK_H,)
    t = load_timesteps(T, stride_t, rows, N)
    acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for j0 in range(0, half, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        s, c = sin_cos(t, j, half, neg_log, inv_den, scale, LIBDEVICE)  # (BLOCK_M, BLOCK_J) each
        acc += _emb_w1(s.to(W1.dtype.element_ty), c.to(W1.dtype.element_ty), W1, hk, j, hidden, half, off_sin,
                       off_cos, stride_w1_h, stride_w1_e, USE_DOT, PRECISION)
    if HAS_B1:
        acc += tl.load(B1 + hk * stride_b1, mask=hk < hidden, other=0.0).to(tl.float32)[None, :]
    h = acc * tl.sigmoid(acc)
    mask = (rows < N)[:, None] & (hk < hidden)[None, :]
    tl.store(H + rows.to(tl.int64)[:, None] * stride_h + hk[None, :], h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _mlp_kernel(
    T,  # timesteps (N,), read when RECOMPUTE
    H,  # h (N, hidden) from _hidden_kernel, row stride stride_h, read unless RECOMPUTE
    W1,  # linear_1.weight (hidden, dim), read when RECOMPUTE
    B1,  # linear_1.bias (hidden,), read when RECOMPUTE and HAS_B1
    W2,  # linear_2.weight (out_features, hidden), strides (stride_w2_o, stride_w2_h)
    B2,  # linear_2.bias (out_features,), read when HAS_B2
    OUT,  # output (N, out_features) in W2's dtype, row stride stride_out
    N,  # number of timesteps
    half,  # frequencies: dim // 2
    hidden,  # hidden units: rows of W1, columns of W2
    out_features,  # rows of W2
    off_sin, off_cos,  # first column of the sin and of the cos half of emb (flip_sin_to_cos)
    stride_t, stride_h, stride_w1_h, stride_w1_e, stride_b1,  # element strides
    stride_w2_o, stride_w2_h, stride_b2, stride_out,  # element strides
    neg_log, inv_den, scale,  # float32 constants of the sinusoid (timestep_embedding_triton.constants)
    RECOMPUTE: tl.constexpr,  # compute h here from the timesteps (one launch) instead of reading H
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,  # the linears have biases
    LIBDEVICE: tl.constexpr,  # libdevice exp/sin/cos (CUDA); tl.* in the interpreter
    USE_DOT: tl.constexpr, PRECISION: tl.constexpr,  # tl.dot (and its input_precision) or a broadcast sum
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_J: tl.constexpr,  # >= half with RECOMPUTE: every frequency at once
    BLOCK_H: tl.constexpr,  # hidden units per step
    BLOCK_O: tl.constexpr,  # output columns per program
):
    pid_m = tl.program_id(0)  # block of rows
    pid_o = tl.program_id(1)  # block of output columns
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    row_ok = rows < N
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)  # (BLOCK_O,)
    wt = W2.dtype.element_ty
    if RECOMPUTE:
        tl.static_assert(BLOCK_M * BLOCK_J <= 16384, "sin and cos of every frequency must fit in registers")
        j = tl.arange(0, BLOCK_J)
        t = load_timesteps(T, stride_t, rows, N)
        s, c = sin_cos(t, j, half, neg_log, inv_den, scale, LIBDEVICE)  # (BLOCK_M, BLOCK_J), once
        s = s.to(wt)  # emb rounded to the weights' dtype, as the UNet casts it
        c = c.to(wt)
    acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        hk = h0 + tl.arange(0, BLOCK_H)  # (BLOCK_H,)
        if RECOMPUTE:
            pre = _emb_w1(s, c, W1, hk, j, hidden, half, off_sin, off_cos, stride_w1_h, stride_w1_e,
                          USE_DOT, PRECISION)  # (BLOCK_M, BLOCK_H)
            if HAS_B1:
                pre += tl.load(B1 + hk * stride_b1, mask=hk < hidden, other=0.0).to(tl.float32)[None, :]
            h = (pre * tl.sigmoid(pre)).to(wt)
        else:
            h = tl.load(H + rows.to(tl.int64)[:, None] * stride_h + hk[None, :],
                        mask=row_ok[:, None] & (hk < hidden)[None, :], other=0.0)
        w2_mask = (hk < hidden)[:, None] & (o < out_features)[None, :]
        w2 = tl.load(W2 + o[None, :] * stride_w2_o + hk[:, None] * stride_w2_h, mask=w2_mask, other=0.0)
        acc += _mm(h, w2, USE_DOT, PRECISION)  # (BLOCK_M, BLOCK_H) @ (BLOCK_H, BLOCK_O)
    if HAS_B2:
        acc += tl.load(B2 + o * stride_b2, mask=o < out_features, other=0.0).to(tl.float32)[None, :]
    mask = row_ok[:, None] & (o < out_features)[None, :]
    tl.store(OUT + rows.to(tl.int64)[:, None] * stride_out + o[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


def _p2(x: int) -> int:
    return next_power_of_2(max(int(x), 1))


def choose_plan(n: int, dim: int, w1: torch.Tensor) -> str:
    """Plan "one" while every program can afford sin/cos of all frequencies and a read of W1, else "two"."""
    fits = _p2(dim // 2) <= ONE_LAUNCH_MAX_HALF and w1.numel() * w1.element_size() <= ONE_LAUNCH_MAX_W1_BYTES
    return "one" if n <= ONE_LAUNCH_MAX_ROWS and fits else "two"


def blocks(plan: str, n: int, half: int, hidden: int, out_features: int, use_dot: bool) -> tuple[dict | None, dict]:
    """Block sizes and warps of ``_hidden_kernel`` (None in plan "one") and of ``_mlp_kernel``.

    A tl.dot operand tile or a broadcast product (BLOCK_M x K x N) stays within TILE elements;
    with few rows, narrower blocks of hidden units and output columns give more programs to read
    the weights (out / 32 of them). Rows: padded to >= 16 for tl.dot, else next_power_of_2(N).
    """
    k = 16 if use_dot else 1  # tl.dot's smallest dimension
    if plan == "one":
        m = 16 if use_dot else min(_p2(n), 16)
        rows = 1 if use_dot else m  # the broadcast product's extra dimension
        j = max(k, _p2(half))  # every frequency at once
        h = max(k, min(_p2(hidden), TILE // (j * rows)))
        o = max(k, min(_p2(out_features), BLOCK_O_ONE, TILE // (h * rows)))
        return None, dict(BLOCK_M=m, BLOCK_J=j, BLOCK_H=h, BLOCK_O=o, num_warps=8 if m * j >= 8192 else 4)
    m = min(max(16, _p2(n)), 64) if use_dot else min(_p2(n), 16)
    width = 32 if n <= 16 else 64  # hidden units of _hidden_kernel, output columns of _mlp_kernel
    if use_dot:
        j, h1, h2, o = (max(k, min(_p2(size), w)) for size, w in ((half, 64), (hidden, width), (hidden, 64),
                                                                  (out_features, width)))
    else:
        j = min(_p2(half), TILE // (16 * m))
        h1 = min(_p2(hidden), TILE // (m * j))
        o = min(_p2(out_features), width)
        h2 = min(_p2(hidden), TILE // (m * o))
    return (dict(BLOCK_M=m, BLOCK_J=j, BLOCK_H=h1, num_warps=4),
            dict(BLOCK_M=m, BLOCK_J=j, BLOCK_H=h2, BLOCK_O=o, num_warps=4))


# launched through CachedKernel: Triton's launch path once per variant, then its compiled kernel directly
_HIDDEN = CachedKernel(_hidden_kernel)
_MLP = CachedKernel(_mlp_kernel)


def launch(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float,
           max_period: float, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
           plan: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """out (N, out_features) in the weights' dtype; arguments validated, N, hidden, out_features >= 1.

    ``plan`` is "auto", "one" (one launch; needs dim // 2 <= ONE_LAUNCH_MAX_HALF) or "two".
    ``out`` (N, out_features), the weights' dtype, unit column stride, receives the result if given.
    """
    n, (hidden, _), out_features = timesteps.shape[0], w1.shape, w2.shape[0]
    half, neg_log, inv_den, scale32 = constants(dim, float(downscale_freq_shift), float(max_period), float(scale))
    plan = choose_plan(n, dim, w1) if plan == "auto" else plan
    if plan not in ("one", "two") or (plan == "one" and _p2(half) > ONE_LAUNCH_MAX_HALF):
        raise ValueError(f"timestep_mlp: plan must be 'auto', 'two' or (dim // 2 <= {ONE_LAUNCH_MAX_HALF}) 'one'; "
                         f"got {plan!r} with dim={dim}")
    if out is None:
        out = torch.empty((n, out_features), dtype=w2.dtype, device=timesteps.device)
    use_dot = w1.dtype != torch.float32 or n >= 16
    if w1.dtype == torch.bfloat16 and not timesteps.is_cuda:
        use_dot = False  # the interpreter's tl.dot multiplies bfloat16 bit patterns (Triton 3.9)
    common = dict(USE_DOT=use_dot, PRECISION="ieee" if w1.dtype == torch.float32 else "tf32",
                  **math_options(timesteps.device))
    bias1, bias2 = (b1 if b1 is not None else w1), (b2 if b2 is not None else w2)  # placeholders when absent
    stride_b1, stride_b2 = (b1.stride(0) if b1 is not None else 0), (b2.stride(0) if b2 is not None else 0)
    offsets = (half, 0) if flip_sin_to_cos else (0, half)  # first column of emb's sin half, of its cos half
    consts = (neg_log, inv_den, scale32)
    hidden_blocks, mlp_blocks = blocks(plan, n, half, hidden, out_features, use_dot)
    h = w1  # plan "one": H is not read
    if hidden_blocks is not None:  # plan "two", launch 1: h = silu(emb @ W1^T + b1)
        h = torch.empty((n, hidden), dtype=w1.dtype, device=timesteps.device)
        grid = (cdiv(n, hidden_blocks["BLOCK_M"]), cdiv(hidden, hidden_blocks["BLOCK_H"]))
        _HIDDEN.launch(
            grid,
            (timesteps, w1, bias1, h, n, half, hidden, *offsets, timesteps.stride(0), *w1.stride(), stride_b1,
             h.stride(0), *consts),
            dict(HAS_B1=b1 is not None, **hidden_blocks, **common))
    grid = (cdiv(n, mlp_blocks["BLOCK_M"]), cdiv(out_features, mlp_blocks["BLOCK_O"]))
    _MLP.launch(
        grid,
        (timesteps, h, w1, bias1, w2, bias2, out, n, half, hidden, out_features, *offsets, timesteps.stride(0),
         h.stride(0), *w1.stride(), stride_b1, *w2.stride(), stride_b2, out.stride(0), *consts),
        dict(RECOMPUTE=hidden_blocks is None, HAS_B1=b1 is not None, HAS_B2=b2 is not None, **mlp_blocks, **common))
    return out
