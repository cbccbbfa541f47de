"""Triton forward of :func:`fusediff.kernels.group_norm`: GroupNorm(+SiLU) over (B, C, S).

x is seen as (B, C, S), S the product of the spatial sizes, with strides (C*S, S, 1) when it is
contiguous (NCHW...) or (S*C, 1, C) when it is channels-last (NHWC, NDHWC): both layouts are
read where they lie, and y is written with x's strides. Each (batch item, group) pair is one
normalisation over CPG = C/G channels by S positions (Wu & He 2018, Sec. 3.1).

Two plans, chosen on the host:
- one pass, when a whole group fits in one program's registers (padded CPG x S <= 16384
  elements): read once, mean and variance in two passes over the registers, write once;
- split, otherwise: the group's positions are cut into SPLIT ranges. ``_partial_stats_kernel``
  reduces each range to (count, mean, M2), tile by tile: a tile's mean and M2 come from two
  passes over its registers and are merged into the running ones with Chan et al.'s pairwise
  update (1979), so no sum of squares ever cancels. ``_apply_kernel`` merges a group's SPLIT
  partials the same way, then reads its range again and writes y. That is one read for the
  statistics and one read plus one write for the output.

Statistics and the affine + SiLU are in float32 for float32, float16 and bfloat16 x; y is
rounded once to x's dtype. Limits: forward only (autograd goes to the reference); x dense in
one of the two layouts (others go to the reference); offsets inside one batch item must fit
in int32 (below 2^31 elements), batch offsets are int64.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

ONE_PASS_MAX = 16384  # padded elements of a group that one program holds in registers
TILE = 2048  # elements per tile of the split plan
MAX_SPLIT = 1024  # ranges per group in the split plan (the apply kernel loads them all)
PROGRAMS_PER_SM = 4  # the split plan aims at this many programs per streaming multiprocessor


@triton.jit
def _one_pass_kernel(
    X,  # input, (B, C, S) with strides (stride_b, stride_c, stride_s)
    Y,  # output, x's shape, dtype and strides
    W,  # weight (C,), read when HAS_W
    Bias,  # bias (C,), read when HAS_B
    G,  # number of groups
    CPG,  # channels per group, C // G
    S,  # positions per channel: the product of the spatial sizes
    stride_b, stride_c, stride_s,  # element strides of x and y over (B, C, S)
    stride_w, stride_bias,  # element strides of weight and bias
    eps,  # added to the variance
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,  # >= CPG, a power of two
    BLOCK_S: tl.constexpr,  # >= S, a power of two
):
    tl.static_assert(BLOCK_C * BLOCK_S <= 16384, "a one-pass group must fit in registers")
    pid = tl.program_id(0)  # one program per (b, g)
    b = pid // G
    g = pid % G
    base = b.to(tl.int64) * stride_b + g * CPG * stride_c
    c = tl.arange(0, BLOCK_C)
    s = tl.arange(0, BLOCK_S)
    c_ok = c < CPG
    mask = c_ok[:, None] & (s < S)[None, :]
    offs = base + c[:, None] * stride_c + s[None, :] * stride_s  # (BLOCK_C, BLOCK_S)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    n = CPG * S * 1.0
    # 1. mean, then 2. the variance of the centred values, both over the registers
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / n
    d = tl.where(mask, x - mean, 0.0)
    var = tl.sum(tl.sum(d * d, axis=1), axis=0) / n
    scale = tl.zeros([BLOCK_C], dtype=tl.float32) + tl.rsqrt(var + eps)  # (BLOCK_C,) per channel
    ch = g * CPG + c
    if HAS_W:
        scale = scale * tl.load(W + ch * stride_w, mask=c_ok, other=0.0).to(tl.float32)
    y = d * scale[:, None]
    if HAS_B:
        y = y + tl.load(Bias + ch * stride_bias, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _partial_stats_kernel(
    X,  # input, (B, C, S) with strides (stride_b, stride_c, stride_s)
    PART,  # float32 (B * G, SPLIT, 3): count, mean, M2 of each range
    G,  # number of groups
    CPG,  # channels per group
    S,  # positions per channel
    S_PER_SPLIT,  # positions per range, a multiple of BLOCK_S
    SPLIT,  # ranges per group
    stride_b, stride_c, stride_s,  # element strides of x over (B, C, S)
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,  # tile, powers of two
):
    pid = tl.program_id(0)  # (b, g)
    split = tl.program_id(1)  # the range of positions
    b = pid // G
    g = pid % G
    base = b.to(tl.int64) * stride_b + g * CPG * stride_c
    s_lo = split * S_PER_SPLIT
    s_hi = tl.minimum(s_lo + S_PER_SPLIT, S)
    zero = tl.sum(tl.zeros([BLOCK_S], dtype=tl.float32), axis=0)  # a float32 scalar
    count = zero
    mean = zero
    m2 = zero
    for c0 in range(0, CPG, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        n_c = tl.minimum(CPG - c0, BLOCK_C)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = (c < CPG)[:, None] & (s < s_hi)[None, :]
            offs = base + c[:, None] * stride_c + s[None, :] * stride_s
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            # 1. the tile's mean and M2, two passes over its registers
            n_t = (n_c * tl.minimum(s_hi - s0, BLOCK_S)).to(tl.float32)
            t_mean = tl.sum(tl.sum(x, axis=1), axis=0) / n_t
            d = tl.where(mask, x - t_mean, 0.0)
            t_m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
            # 2. merged into the running (count, mean, M2): Chan, Golub & LeVeque's pairwise update
            total = count + n_t
            delta = t_mean - mean
            mean = mean + delta * (n_t / total)
            m2 = m2 + t_m2 + delta * delta * (count * (n_t / total))
            count = total
    out = PART + (pid * SPLIT + split) * 3
    tl.store(out, count)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def _apply_kernel(
    X,  # input, (B, C, S) with strides (stride_b, stride_c, stride_s)
    Y,  # output, x's shape, dtype and strides
    W,  # weight (C,), read when HAS_W
    Bias,  # bias (C,), read when HAS_B
    PART,  # float32 (B * G, SPLIT, 3) from _partial_stats_kernel
    G, CPG, S, S_PER_SPLIT, SPLIT,  # as in _partial_stats_kernel
    stride_b, stride_c, stride_s,  # element strides of x and y over (B, C, S)
    stride_w, stride_bias,  # element strides of weight and bias
    eps,  # added to the variance
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,  # tile, powers of two
    BLOCK_SPLIT: tl.constexpr,  # >= SPLIT, a power of two
):
    pid = tl.program_id(0)  # (b, g)
    split = tl.program_id(1)  # the range of positions this program writes
    b = pid // G
    g = pid % G
    # 1. the group's statistics from its SPLIT partials (the pairwise merge, all at once)
    i = tl.arange(0, BLOCK_SPLIT)
    i_ok = i < SPLIT
    part = PART + (pid * SPLIT + i) * 3
    cnt = tl.load(part, mask=i_ok, other=0.0)
    mu = tl.load(part + 1, mask=i_ok, other=0.0)
    m2 = tl.load(part + 2, mask=i_ok, other=0.0)
    n = tl.sum(cnt, axis=0)
    mean = tl.sum(cnt * mu, axis=0) / n
    dm = tl.where(i_ok, mu - mean, 0.0)
    rstd = tl.rsqrt((tl.sum(m2, axis=0) + tl.sum(cnt * dm * dm, axis=0)) / n + eps)
    # 2. y = (x - mean) * rstd * w + bias, then SiLU, over this program's range
    base = b.to(tl.int64) * stride_b + g * CPG * stride_c
    s_lo = split * S_PER_SPLIT
    s_hi = tl.minimum(s_lo + S_PER_SPLIT, S)
    for c0 in range(0, CPG, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < CPG
        ch = g * CPG + c
        scale = tl.zeros([BLOCK_C], dtype=tl.float32) + rstd
        if HAS_W:
            scale = scale * tl.load(W + ch * stride_w, mask=c_ok, other=0.0).to(tl.float32)
        shift = tl.zeros([BLOCK_C], dtype=tl.float32)
        if HAS_B:
            shift = tl.load(Bias + ch * stride_bias, mask=c_ok, other=0.0).to(tl.float32)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = c_ok[:, None] & (s < s_hi)[None, :]
            offs = base + c[:, None] * stride_c + s[None, :] * stride_s
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * scale[:, None] + shift[:, None]
            if SILU:
                y = y * tl.sigmoid(y)
            tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)  # read once per device, not at every launch
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs are enough
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tile(cpg: int, s: int, channels_last: bool, limit: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S) of at most ``limit`` elements, long along the dimension memory runs along."""
    bc, bs = triton.next_power_of_2(cpg), triton.next_power_of_2(s)
    if channels_last:
        bc = min(bc, limit)
        return bc, min(bs, max(1, limit // bc))
    bs = min(bs, limit)
    return min(bc, max(1, limit // bs)), bs


def launch(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
           eps: float, silu: bool, channels_last: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = group_norm(x) (+ SiLU) by the Triton kernels; x validated, non-empty and dense in the
    layout named; ``out`` (x's shape, dtype and strides) receives y if given."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):
            return launch(x, num_groups, weight, bias, eps, silu, channels_last, out)
    batch, channels = x.shape[0], x.shape[1]
    s = x.numel() // (batch * channels)
    cpg = channels // num_groups
    strides = (s * channels, 1, channels) if channels_last else (channels * s, s, 1)
    y = torch.empty_like(x) if out is None else out  # x is dense, so y gets its strides
    w = weight if weight is not None else x  # a placeholder pointer when absent
    bb = bias if bias is not None else x
    affine = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu)
    param_strides = (w.stride(0) if weight is not None else 0, bb.stride(0) if bias is not None else 0)
    groups = batch * num_groups
    full_c, full_s = triton.next_power_of_2(cpg), triton.next_power_of_2(s)
    if full_c * full_s <= ONE_PASS_MAX:
        warps = min(16, max(1, full_c * full_s // 1024))
        _one_pass_kernel[(groups,)](x, y, w, bb, num_groups, cpg, s, *strides, *param_strides, eps,
                                    **affine, BLOCK_C=full_c, BLOCK_S=full_s, num_warps=warps)
        return y
    block_c, block_s = _tile(cpg, s, channels_last, TILE)
    want = _cdiv(PROGRAMS_PER_SM * _sm_count(x.device), groups)
    split = max(1, min(want, _cdiv(s, block_s), MAX_SPLIT))
    s_per_split = _cdiv(_cdiv(s, split), block_s) * block_s  # whole tiles per range
    split = _cdiv(s, s_per_split)
    part = torch.empty((groups, split, 3), dtype=torch.float32, device=x.device)
    grid = (groups, split)
    tile = dict(BLOCK_C=block_c, BLOCK_S=block_s, num_warps=4)
    _partial_stats_kernel[grid](x, part, num_groups, cpg, s, s_per_split, split, *strides, **tile)
    _apply_kernel[grid](x, y, w, bb, part, num_groups, cpg, s, s_per_split, split, *strides, *param_strides,
                        eps, **affine, **tile, BLOCK_SPLIT=triton.next_power_of_2(split))
    return y
