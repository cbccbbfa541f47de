"""Triton backward of :func:`fusediff.kernels.group_norm`: dx, dweight and dbias of GroupNorm(+SiLU).

x, dy and dx are seen as (B, C, S) in the layout of the forward (NCHW... strides (C*S, S, 1),
or channels-last (S*C, 1, C)), read and written where they lie. The forward saved each
(batch item, group)'s float32 mean and rstd = 1/sqrt(var + eps); with x_hat = (x - mean) * rstd
and the pre-activation y = x_hat * w + b, the chain rule through the normalisation (Wu & He 2018,
arXiv:1803.08494, Sec. 3.1; the same algebra as batch norm's backward, Ioffe & Szegedy 2015,
Sec. 3) gives, per (b, g) over its N = C/G * S elements:

    dy'     = dy * s * (1 + y * (1 - s)),  s = sigmoid(y)     SiLU's derivative (else dy' = dy)
    g       = dy' * w[c]                                      the gradient of x_hat
    dx      = rstd * (g - mean_N(g) - x_hat * mean_N(g * x_hat))
    dw[c]   = sum_{b, s} dy' * x_hat        db[c] = sum_{b, s} dy'

Both group means come from two per-(b, c) sums, sum_s dy' and sum_s dy' * x_hat, weighted by
w[c] over the group's channels; the same sums, added over b, are db and dw. So:

- one pass, when x and dy of a whole group fit in one program's registers: one program per
  (b, g) reads x and dy once, reduces, and writes dx and its per-(b, c) sums;
- split, otherwise: ``_partial_sums_kernel`` reduces ranges of positions of every channel to
  the two sums, ``_group_sums_kernel`` merges them per (b, c) and per (b, g), and
  ``_input_grad_kernel`` reads x and dy again to write dx.

Then ``_param_grad_kernel`` adds the per-(b, c) sums over b in order. Every sum is float32 and
done in a fixed order: no atomics, the result is bit-for-bit deterministic. Limits: float32,
float16 and bfloat16; dy is copied to x's layout when its strides differ; offsets inside one
batch item must fit in int32, batch offsets are int64; double backward is not supported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import CachedKernel, cdiv, next_power_of_2, scratch
from .group_norm_triton import padded_group_size, split_geometry

TILE = 4096  # elements per tile of the split plan (x and dy each)
TILE_WARPS = 4  # warps per program of the split plan's sums and dx kernels
MAX_SPLIT = 1024  # ranges of positions per channel in the split plan
PROGRAMS_PER_SM = 4  # the sums kernel aims at this many programs per streaming multiprocessor
ONE_PASS_MAX = 8192  # padded elements of a group held in registers (twice: x and dy)
ONE_PASS_ELEMS_PER_WARP = 512  # the one-pass program has one warp per this many elements (at most 16)
MERGE_TILE = 4096  # partial sums one program of the merge holds at a time
PARAM_BLOCK = 1024  # channels per program of the dweight / dbias sum over the batch


@triton.jit
def _dy_pre(x_hat, dy, w, bias, SILU: tl.constexpr):
    """dy through SiLU's derivative at the recomputed pre-activation y = x_hat * w + b (float32)."""
    if SILU:
        y = x_hat * w + bias
        sig = tl.sigmoid(y)
        dy = dy * sig * (1.0 + y * (1.0 - sig))
    return dy


@triton.jit
def _one_pass_kernel(
    X,  # input of the forward, (B, C, S) with strides (stride_b, stride_c, stride_s)
    DY,  # gradient of the output, x's shape and strides
    DX,  # gradient of x, out: x's shape, dtype and strides
    MEAN, RSTD,  # float32 (B, G): each group's mean and 1 / sqrt(var + eps) from the forward
    W,  # weight (C,), read when HAS_W
    Bias,  # bias (C,), read when HAS_B (only SiLU's pre-activation needs it)
    CSUM,  # float32 (B, 2, C) out: per channel, sum_s dy' * x_hat and sum_s dy'
    G, CPG, C, S,  # groups, channels per group, channels, positions per channel
    stride_b, stride_c, stride_s,  # element strides of x, dy and dx over (B, C, S)
    stride_w, stride_bias,  # element strides of weight and bias
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,  # >= CPG and >= S, powers of two
):
    tl.static_assert(BLOCK_C * BLOCK_S <= 8192, "a one-pass group (x and dy) must fit in registers")
    pid = tl.program_id(0)  # one program per (b, g)
    b = pid // G
    g = pid % G
    c = tl.arange(0, BLOCK_C)
    c_ok = c < CPG
    mask = c_ok[:, None] & (tl.arange(0, BLOCK_S) < S)[None, :]
    ch = g * CPG + c  # (BLOCK_C,) the group's channels
    offs = b.to(tl.int64) * stride_b + (ch[:, None] * stride_c + tl.arange(0, BLOCK_S)[None, :] * stride_s)
    mean = tl.load(MEAN + pid)
    rstd = tl.load(RSTD + pid)
    w = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_W:
        w = tl.load(W + ch * stride_w, mask=c_ok, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_B:
        bias = tl.load(Bias + ch * stride_bias, mask=c_ok, other=0.0).to(tl.float32)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
    dyp = _dy_pre(x_hat, dy, w[:, None], bias[:, None], SILU)  # 0 where masked, as dy is
    # 1. per-channel sums, 2. the group means of g = dy' * w and g * x_hat, 3. dx
    s_dyx = tl.sum(dyp * x_hat, axis=1)  # (BLOCK_C,)
    s_dy = tl.sum(dyp, axis=1)
    csum = CSUM + b * 2 * C + ch
    tl.store(csum, s_dyx, mask=c_ok)
    tl.store(csum + C, s_dy, mask=c_ok)
    n = CPG * S * 1.0
    mean_g = tl.sum(w * s_dy, axis=0) / n
    mean_gx = tl.sum(w * s_dyx, axis=0) / n
    dx = rstd * (dyp * w[:, None] - mean_g - x_hat * mean_gx)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _partial_sums_kernel(
    X, DY,  # input of the forward and gradient of the output, (B, C, S), strides as below
    MEAN, RSTD,  # float32 (B, G) from the forward
    W, Bias,  # weight and bias (C,), read when HAS_W / HAS_B
    PART,  # float32 (B, SPLIT, 2, C) out: per channel and range, sum dy' * x_hat and sum dy'
    G, CPG, C, S,  # groups, channels per group, channels, positions per channel
    S_PER_SPLIT,  # positions per range, a multiple of BLOCK_S
    SPLIT,  # ranges per channel
    stride_b, stride_c, stride_s,  # element strides of x and dy over (B, C, S)
    stride_w, stride_bias,  # element strides of weight and bias
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,  # tile, powers of two
):
    tl.static_assert(BLOCK_C * BLOCK_S <= 16384, "a tile must fit in registers")
    b = tl.program_id(2)
    split = tl.program_id(1)  # the range of positions
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,) channels of this program
    c_ok = c < C
    grp = b * G + c // CPG
    mean = tl.load(MEAN + grp, mask=c_ok, other=0.0)[:, None]
    rstd = tl.load(RSTD + grp, mask=c_ok, other=0.0)[:, None]
    w = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_W:
        w = tl.load(W + c * stride_w, mask=c_ok, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_B:
        bias = tl.load(Bias + c * stride_bias, mask=c_ok, other=0.0).to(tl.float32)
    base = b.to(tl.int64) * stride_b
    s_lo = split * S_PER_SPLIT
    s_hi = tl.minimum(s_lo + S_PER_SPLIT, S)
    acc_dyx = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)  # per element of the tile, summed at the end
    acc_dy = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = c_ok[:, None] & (s < s_hi)[None, :]
        offs = base + (c[:, None] * stride_c + s[None, :] * stride_s)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
        dyp = _dy_pre(x_hat, dy, w[:, None], bias[:, None], SILU)
        acc_dyx += dyp * x_hat
        acc_dy += dyp
    out = PART + ((b * SPLIT + split) * 2) * C + c
    tl.store(out, tl.sum(acc_dyx, axis=1), mask=c_ok)
    tl.store(out + C, tl.sum(acc_dy, axis=1), mask=c_ok)


@triton.jit
def _group_sums_kernel(
    PART,  # float32 (B, SPLIT, 2, C) from _partial_sums_kernel
    CSUM,  # float32 (B, 2, C) out: per channel, sum_s dy' * x_hat and sum_s dy'
    COEF,  # float32 (B, G, 2) out: per group, mean_N(g * x_hat) and mean_N(g), g = dy' * w
    W,  # weight (C,), read when HAS_W
    G, CPG, C, S, SPLIT,  # groups, channels per group, channels, positions, ranges per channel
    stride_w,  # element stride of weight
    HAS_W: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr, BLOCK_C: tl.constexpr,  # tile of partials, powers of two, BLOCK_C >= CPG
):
    tl.static_assert(BLOCK_SPLIT * BLOCK_C <= 16384, "a tile of partials must fit in registers")
    pid = tl.program_id(0)  # (b, g)
    b = pid // G
    g = pid % G
    c = g * CPG + tl.arange(0, BLOCK_C)  # (BLOCK_C,) the group's channels
    c_ok = tl.arange(0, BLOCK_C) < CPG
    part = PART + (b * SPLIT * 2) * C
    acc_dyx = tl.zeros([BLOCK_SPLIT, BLOCK_C], dtype=tl.float32)
    acc_dy = tl.zeros([BLOCK_SPLIT, BLOCK_C], dtype=tl.float32)
    for i0 in range(0, SPLIT, BLOCK_SPLIT):
        i = i0 + tl.arange(0, BLOCK_SPLIT)
        mask = (i < SPLIT)[:, None] & c_ok[None, :]
        offs = (i * 2 * C)[:, None] + c[None, :]
        acc_dyx += tl.load(part + offs, mask=mask, other=0.0)
        acc_dy += tl.load(part + offs + C, mask=mask, other=0.0)
    s_dyx = tl.sum(acc_dyx, axis=0)  # (BLOCK_C,)
    s_dy = tl.sum(acc_dy, axis=0)
    csum = CSUM + b * 2 * C + c
    tl.store(csum, s_dyx, mask=c_ok)
    tl.store(csum + C, s_dy, mask=c_ok)
    w = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_W:
        w = tl.load(W + c * stride_w, mask=c_ok, other=0.0).to(tl.float32)
    n = (CPG * S).to(tl.float32)
    tl.store(COEF + pid * 2, tl.sum(w * s_dyx, axis=0) / n)
    tl.store(COEF + pid * 2 + 1, tl.sum(w * s_dy, axis=0) / n)


@triton.jit
def _input_grad_kernel(
    X, DY,  # input of the forward and gradient of the output, (B, C, S), strides as below
    DX,  # gradient of x, out: x's shape, dtype and strides
    MEAN, RSTD,  # float32 (B, G) from the forward
    COEF,  # float32 (B, G, 2) from _group_sums_kernel
    W, Bias,  # weight and bias (C,), read when HAS_W / HAS_B
    G, CPG, C, S,  # groups, channels per group, channels, positions per channel
    stride_b, stride_c, stride_s,  # element strides of x, dy and dx over (B, C, S)
    stride_w, stride_bias,  # element strides of weight and bias
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,  # tile, powers of two
):
    tl.static_assert(BLOCK_C * BLOCK_S <= 16384, "a tile must fit in registers")
    n_c = tl.cdiv(C, BLOCK_C)
    n_s = tl.cdiv(S, BLOCK_S)
    pid = tl.num_programs(0) - 1 - tl.program_id(0)  # last tile first: the sums pass read it last
    b = pid // (n_c * n_s)
    rest = pid % (n_c * n_s)
    c = (rest // n_s) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    s = (rest % n_s) * BLOCK_S + tl.arange(0, BLOCK_S)  # (BLOCK_S,)
    c_ok = c < C
    mask = c_ok[:, None] & (s < S)[None, :]
    grp = b * G + c // CPG
    mean = tl.load(MEAN + grp, mask=c_ok, other=0.0)[:, None]
    rstd = tl.load(RSTD + grp, mask=c_ok, other=0.0)[:, None]
    mean_gx = tl.load(COEF + grp * 2, mask=c_ok, other=0.0)[:, None]
    mean_g = tl.load(COEF + grp * 2 + 1, mask=c_ok, other=0.0)[:, None]
    w = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_W:
        w = tl.load(W + c * stride_w, mask=c_ok, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_B:
        bias = tl.load(Bias + c * stride_bias, mask=c_ok, other=0.0).to(tl.float32)
    offs = b.to(tl.int64) * stride_b + (c[:, None] * stride_c + s[None, :] * stride_s)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    x_hat = (x - mean) * rstd
    dyp = _dy_pre(x_hat, dy, w[:, None], bias[:, None], SILU)
    dx = rstd * (dyp * w[:, None] - mean_g - x_hat * mean_gx)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _param_grad_kernel(
    CSUM,  # float32 (B, 2, C): per (b, c), sum_s dy' * x_hat and sum_s dy'
    DW, DB,  # float32 (C,) out: dweight and dbias
    B, C,  # batch size, channels
    BLOCK: tl.constexpr,  # channels per program, a power of two
):
    tl.static_assert(BLOCK <= 4096, "channels per program")
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c_ok = c < C
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    for b in range(0, B):  # in order: deterministic
        dw += tl.load(CSUM + b * 2 * C + c, mask=c_ok, other=0.0)
        db += tl.load(CSUM + b * 2 * C + C + c, mask=c_ok, other=0.0)
    tl.store(DW + c, dw, mask=c_ok)
    tl.store(DB + c, db, mask=c_ok)


def fits_one_pass(x: torch.Tensor, num_groups: int) -> bool:
    """Whether x and dy of a padded group fit in one backward program's registers."""
    return padded_group_size(x, num_groups) <= ONE_PASS_MAX


def plan(x: torch.Tensor, num_groups: int) -> str:
    """"one_pass" when x and dy of a padded group fit in registers, else "split"."""
    return "one_pass" if fits_one_pass(x, num_groups) else "split"


# launched through CachedKernel: Triton's launch path once per variant, then its compiled kernel directly
_ONE_PASS = CachedKernel(_one_pass_kernel)
_PARTIAL_SUMS = CachedKernel(_partial_sums_kernel)
_GROUP_SUMS = CachedKernel(_group_sums_kernel)
_INPUT_GRAD = CachedKernel(_input_grad_kernel)
_PARAM_GRAD = CachedKernel(_param_grad_kernel)


def launch_backward(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                    weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int, silu: bool,
                    channels_last: bool, force_plan: str | None = None, out: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) of group_norm(x) (+ SiLU) given dy, by the Triton kernels.

    x is non-empty and dense in the layout named (as in the forward), mean and rstd are the
    float32 (B, G) the forward wrote; dy has x's shape and any strides (copied to x's layout when
    they differ). dx has x's dtype and strides; dweight and dbias are float32 (C,), computed
    whether or not weight and bias exist (1 and 0 stand in for them). ``out`` (x's shape, dtype
    and strides) receives dx if given. ``force_plan`` ("one_pass" or "split"; for tests and
    benchmarks) overrides :func:`plan`.
    """
    batch, channels = x.shape[0], x.shape[1]
    s = x.numel() // (batch * channels)
    cpg = channels // num_groups
    fmt = torch.contiguous_format
    if channels_last:
        fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    dy = dy.to(x.dtype).contiguous(memory_format=fmt)  # a no-op when dy already lies like x
    strides = (s * channels, 1, channels) if channels_last else (channels * s, s, 1)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    dx = torch.empty_like(x) if out is None else out  # x is dense, so dx gets its strides
    w = weight if weight is not None else x  # a placeholder pointer when absent
    bb = bias if bias is not None else x
    stride_w = w.stride(0) if weight is not None else 0
    stride_bias = bb.stride(0) if bias is not None else 0
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu)
    csum = scratch(x, "group_norm_bwd.csum", batch * 2 * channels)  # (B, 2, C) float32
    which = force_plan or plan(x, num_groups)
    if which == "one_pass":
        if not fits_one_pass(x, num_groups):
            raise ValueError(f"group_norm backward: a group of {cpg} x {s} does not fit the one-pass plan")
        full_c, full_s = next_power_of_2(cpg), next_power_of_2(s)
        warps = min(16, max(1, full_c * full_s // ONE_PASS_ELEMS_PER_WARP))
        _ONE_PASS.launch(
            (batch * num_groups,),
            (x, dy, dx, mean, rstd, w, bb, csum, num_groups, cpg, channels, s, *strides, stride_w, stride_bias),
            dict(**flags, BLOCK_C=full_c, BLOCK_S=full_s, num_warps=warps))
    else:
        block_c, block_s, n_c, split, s_per_split = split_geometry(x, s, channels_last, TILE, PROGRAMS_PER_SM,
                                                                  MAX_SPLIT)
        part = scratch(x, "group_norm_bwd.part", batch * split * 2 * channels)  # (B, SPLIT, 2, C) float32
        coef = scratch(x, "group_norm_bwd.coef", batch * num_groups * 2)  # (B, G, 2) float32
        tile = dict(BLOCK_C=block_c, BLOCK_S=block_s, num_warps=TILE_WARPS)
        _PARTIAL_SUMS.launch(
            (n_c, split, batch),
            (x, dy, mean, rstd, w, bb, part, num_groups, cpg, channels, s, s_per_split, split, *strides, stride_w,
             stride_bias),
            dict(**flags, **tile))
        full_c = next_power_of_2(cpg)
        block_split = min(next_power_of_2(split), max(1, MERGE_TILE // full_c))
        _GROUP_SUMS.launch(
            (batch * num_groups,),
            (part, csum, coef, w, num_groups, cpg, channels, s, split, stride_w),
            dict(HAS_W=weight is not None, BLOCK_SPLIT=block_split, BLOCK_C=full_c, num_warps=4))
        _INPUT_GRAD.launch(
            (batch * n_c * cdiv(s, block_s),),
            (x, dy, dx, mean, rstd, coef, w, bb, num_groups, cpg, channels, s, *strides, stride_w, stride_bias),
            dict(**flags, **tile))
    dw = torch.empty(channels, dtype=torch.float32, device=x.device)
    db = torch.empty_like(dw)
    block = min(PARAM_BLOCK, next_power_of_2(channels))
    _PARAM_GRAD.launch((cdiv(channels, block),), (csum, dw, db, batch, channels), dict(BLOCK=block, num_warps=4))
    return dx, dw, db
