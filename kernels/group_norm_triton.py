"""Triton forward of :func:`fusediff.kernels.group_norm`: GroupNorm(+SiLU) over (B, C, S).

x is seen as (B, C, S), S the product of the spatial sizes, with strides (C*S, S, 1) when it is
contiguous (NCHW...) or (S*C, 1, C) when it is channels-last (NHWC, NDHWC): both layouts are
read where they lie, and y is written with x's strides. Each (batch item, group) pair is one
normalisation over CPG = C/G channels by S positions (Wu & He 2018, Sec. 3.1).

Two plans, chosen on the host by :func:`plan`:
- one pass, when a whole group fits in one program's registers (padded CPG x S <= 16384
  elements): read once, mean and variance in two passes over the registers, write once;
- split, in three launches. ``_channel_stats_kernel`` cuts every channel's positions
  into SPLIT ranges and reduces each range to its (mean, M2) by Welford's update (1962),
  held per element of the tile so that the loop has no reduction across threads; the tile's
  columns are merged once at the end, and a partial last tile is merged with Chan et al.'s
  pairwise update (1979). No sum of squares ever cancels. Tiles run along the
  dimension memory runs along (positions in NCHW, channels in NHWC), whole rows of channels
  at once, so both layouts are read in full cache lines. ``_finalize_kernel`` merges a group's
  SPLIT x C/G partials the same way (mean first, then M2 around it) into a per-channel
  (mean, rstd * weight). ``_apply_kernel`` then reads x again and writes y, visiting tiles last
  first so that its first reads find what the statistics pass read last still in L2. That is
  one read for the statistics and one read plus one write for the output.

Statistics and the affine + SiLU are in float32 for float32, float16 and bfloat16 x; y is
rounded once to x's dtype. For training, :func:`launch` also writes each group's float32 mean
and rstd = 1/sqrt(var + eps) from the kernels that compute them (the one-pass program, or the
merge), which the backward of ``group_norm_backward_triton.py`` reads. Limits: x dense in
one of the two layouts (others go to the reference); offsets inside one batch item must fit
in int32 (below 2^31 elements), batch offsets are int64.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import CachedKernel, cdiv, next_power_of_2, scratch

ONE_PASS_MAX = 16384  # padded elements of a group that one program holds in registers
ONE_PASS_ELEMS_PER_WARP = 1024  # the one-pass program has one warp per this many elements (at most 16)
TILE = 4096  # elements per tile of the split plan
TILE_WARPS = 4  # warps per program of the split plan's statistics and apply kernels
MAX_TILE_C = 64  # channels per tile along C (channels-last), so that a tile has several rows
MAX_SPLIT = 1024  # ranges of positions per channel in the split plan
PROGRAMS_PER_SM = 4  # the statistics kernel aims at this many programs per streaming multiprocessor
FINALIZE_TILE = 4096  # partials one program of the merge holds at a time


@triton.jit
def _plus_channel_term(x, ADD, b, ch, c_ok, stride_add_b, stride_add_c):
    """x (BLOCK_C, BLOCK_S) float32 plus add[b, ch] along its rows, rounded to add's dtype (x's) as torch's
    ``x + add[:, :, None, None]`` rounds it: then the statistics and the output are those of that sum."""
    a = tl.load(ADD + b.to(tl.int64) * stride_add_b + ch * stride_add_c, mask=c_ok, other=0.0).to(tl.float32)
    return (x + a[:, None]).to(ADD.dtype.element_ty).to(tl.float32)


@triton.jit
def _one_pass_kernel(
    X,  # input, (B, C, S) with strides (stride_b, stride_c, stride_s)
    Y,  # output, x's shape, dtype and strides
    W,  # weight (C,), read when HAS_W
    Bias,  # bias (C,), read when HAS_B
    ADD,  # (B, C) in x's dtype, added to x per (batch item, channel) before the norm, read when HAS_ADD
    MEAN,  # float32 (B, G) out: each group's mean, written when WRITE_STATS
    RSTD,  # float32 (B, G) out: each group's 1 / sqrt(var + eps), written when WRITE_STATS
    G,  # number of groups
    CPG,  # channels per group, C // G
    S,  # positions per channel: the product of the spatial sizes
    stride_b, stride_c, stride_s,  # element strides of x and y over (B, C, S)
    stride_w, stride_bias,  # element strides of weight and bias
    stride_add_b, stride_add_c,  # element strides of add over (B, C)
    eps,  # added to the variance
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, SILU: tl.constexpr,
    WRITE_STATS: tl.constexpr,  # also write mean and rstd, for the backward
    BLOCK_C: tl.constexpr,  # >= CPG, a power of two
    BLOCK_S: tl.constexpr,  # >= S, a power of two
):
    tl.static_assert(BLOCK_C * BLOCK_S <= 16384, "a one-pass group must fit in registers")
    pid = tl.program_id(0)  # one program per (b, g)
    b = pid // G
    g = pid % G
    c = tl.arange(0, BLOCK_C)
    s = tl.arange(0, BLOCK_S)
    c_ok = c < CPG
    mask = c_ok[:, None] & (s < S)[None, :]
    offs = (g * CPG + c[:, None]) * stride_c + s[None, :] * stride_s  # (BLOCK_C, BLOCK_S), int32
    batch = b.to(tl.int64) * stride_b  # the batch offset alone is int64
    X += batch
    Y += batch
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    ch = g * CPG + c
    if HAS_ADD:
        x = tl.where(mask, _plus_channel_term(x, ADD, b, ch, c_ok, stride_add_b, stride_add_c), 0.0)
    n = CPG * S * 1.0
    # 1. mean, then 2. the variance of the centred values, both over the registers
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / n
    d = tl.where(mask, x - mean, 0.0)
    var = tl.sum(tl.sum(d * d, axis=1), axis=0) / n
    rstd = tl.rsqrt(var + eps)
    if WRITE_STATS:
        tl.store(MEAN + pid, mean)
        tl.store(RSTD + pid, rstd)
    scale = tl.zeros([BLOCK_C], dtype=tl.float32) + rstd  # (BLOCK_C,) per channel
    if HAS_W:
        scale = scale * tl.load(W + ch * stride_w, mask=c_ok, other=0.0).to(tl.float32)
    y = d * scale[:, None]
    if HAS_B:
        y = y + tl.load(Bias + ch * stride_bias, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _channel_stats_kernel(
    X,  # input, (B, C, S) with strides (stride_b, stride_c, stride_s)
    ADD,  # (B, C) in x's dtype, added to x before the statistics, read when HAS_ADD
    PART,  # float32 (B, SPLIT, 2, C): per channel, the mean and M2 of each range of positions
    C,  # channels
    S,  # positions per channel
    S_PER_SPLIT,  # positions per range, a multiple of BLOCK_S
    SPLIT,  # ranges per channel
    stride_b, stride_c, stride_s,  # element strides of x over (B, C, S)
    stride_add_b, stride_add_c,  # element strides of add over (B, C)
    HAS_ADD: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,  # tile, powers of two
):
    b = tl.program_id(2)
    split = tl.program_id(1)  # the range of positions
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,) channels of this program
    c_ok = c < C
    xb = X + b.to(tl.int64) * stride_b  # offsets inside one batch item are int32
    s_lo = split * S_PER_SPLIT
    s_hi = tl.minimum(s_lo + S_PER_SPLIT, S)
    # 1. whole tiles: Welford's update per element of the tile, n values in every slot so far
    n_full = (s_hi - s_lo) // BLOCK_S
    mean_t = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    m2_t = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    s = s_lo + tl.arange(0, BLOCK_S)
    ptrs = xb + c[:, None] * stride_c + s[None, :] * stride_s
    for i in range(0, n_full):
        x = tl.load(ptrs, mask=c_ok[:, None], other=0.0).to(tl.float32)
        if HAS_ADD:  # channels past C read 0 + 0
            x = _plus_channel_term(x, ADD, b, c, c_ok, stride_add_b, stride_add_c)
        delta = x - mean_t
        mean_t += delta * (1.0 / (i + 1))
        m2_t += delta * (x - mean_t)
        ptrs += BLOCK_S * stride_s
    # 2. the BLOCK_S slots of a channel, n_full values each, merged at once (mean, then M2 around it)
    count = (n_full * BLOCK_S).to(tl.float32)
    mean = tl.sum(mean_t, axis=1) / BLOCK_S
    dm = mean_t - mean[:, None]
    m2 = tl.sum(m2_t, axis=1) + n_full.to(tl.float32) * tl.sum(dm * dm, axis=1)
    # 3. a partial last tile: its own two-pass mean and M2, merged by Chan, Golub & LeVeque's update
    s0 = s_lo + n_full * BLOCK_S
    if s0 < s_hi:
        s = s0 + tl.arange(0, BLOCK_S)
        mask = c_ok[:, None] & (s < s_hi)[None, :]
        x = tl.load(xb + c[:, None] * stride_c + s[None, :] * stride_s, mask=mask, other=0.0).to(tl.float32)
        if HAS_ADD:
            x = tl.where(mask, _plus_channel_term(x, ADD, b, c, c_ok, stride_add_b, stride_add_c), 0.0)
        n_t = (s_hi - s0).to(tl.float32)
        t_mean = tl.sum(x, axis=1) / n_t
        d = tl.where(mask, x - t_mean[:, None], 0.0)
        t_m2 = tl.sum(d * d, axis=1)
        total = count + n_t
        delta = t_mean - mean
        mean = mean + delta * (n_t / total)
        m2 = m2 + t_m2 + delta * delta * (count * (n_t / total))
    out = PART + ((b * SPLIT + split) * 2) * C + c
    tl.store(out, mean, mask=c_ok)
    tl.store(out + C, m2, mask=c_ok)


@triton.jit
def _finalize_kernel(
    PART,  # float32 (B, SPLIT, 2, C) from _channel_stats_kernel
    STAT,  # float32 (B, C, 2) out: per channel, the group's mean and rstd * weight
    W,  # weight (C,), read when HAS_W
    MEAN,  # float32 (B, G) out: each group's mean, written when WRITE_STATS
    RSTD,  # float32 (B, G) out: each group's 1 / sqrt(var + eps), written when WRITE_STATS
    G, CPG, C, S, S_PER_SPLIT, SPLIT,  # as in _channel_stats_kernel; G groups of CPG channels
    stride_w,  # element stride of weight
    eps,  # added to the variance
    HAS_W: tl.constexpr,
    WRITE_STATS: tl.constexpr,  # also write mean and rstd, for the backward
    BLOCK_SPLIT: tl.constexpr, BLOCK_C: tl.constexpr,  # tile of partials, powers of two, BLOCK_C >= CPG
):
    pid = tl.program_id(0)  # (b, g)
    b = pid // G
    g = pid % G
    c = g * CPG + tl.arange(0, BLOCK_C)  # (BLOCK_C,) the group's channels
    c_ok = tl.arange(0, BLOCK_C) < CPG
    part = PART + (b * SPLIT * 2) * C
    n = (CPG * S).to(tl.float32)
    # the group's (count, mean, M2) from its SPLIT x CPG partials: the pairwise merge, all at
    # once, in two passes (the mean first, then M2 around it)
    acc = tl.zeros([BLOCK_SPLIT, BLOCK_C], dtype=tl.float32)
    for i0 in range(0, SPLIT, BLOCK_SPLIT):
        i = i0 + tl.arange(0, BLOCK_SPLIT)
        mask = (i < SPLIT)[:, None] & c_ok[None, :]
        cnt = tl.minimum(S - i * S_PER_SPLIT, S_PER_SPLIT).to(tl.float32)  # (BLOCK_SPLIT,) range sizes
        mu = tl.load(part + (i * 2 * C)[:, None] + c[None, :], mask=mask, other=0.0)
        acc += tl.where(mask, cnt[:, None] * mu, 0.0)
    mean = tl.sum(tl.sum(acc, axis=1), axis=0) / n
    acc = tl.zeros([BLOCK_SPLIT, BLOCK_C], dtype=tl.float32)
    for i0 in range(0, SPLIT, BLOCK_SPLIT):
        i = i0 + tl.arange(0, BLOCK_SPLIT)
        mask = (i < SPLIT)[:, None] & c_ok[None, :]
        cnt = tl.minimum(S - i * S_PER_SPLIT, S_PER_SPLIT).to(tl.float32)
        offs = (i * 2 * C)[:, None] + c[None, :]
        mu = tl.load(part + offs, mask=mask, other=0.0)
        m2 = tl.load(part + offs + C, mask=mask, other=0.0)
        dm = mu - mean
        acc += tl.where(mask, m2 + cnt[:, None] * dm * dm, 0.0)
    rstd = tl.rsqrt(tl.sum(tl.sum(acc, axis=1), axis=0) / n + eps)
    if WRITE_STATS:
        tl.store(MEAN + pid, mean)
        tl.store(RSTD + pid, rstd)
    scale = tl.zeros([BLOCK_C], dtype=tl.float32) + rstd
    if HAS_W:
        scale = scale * tl.load(W + c * stride_w, mask=c_ok, other=0.0).to(tl.float32)
    stat = STAT + (b * C + c) * 2
    tl.store(stat, tl.zeros([BLOCK_C], dtype=tl.float32) + mean, mask=c_ok)
    tl.store(stat + 1, scale, mask=c_ok)


@triton.jit
def _apply_kernel(
    X,  # input, (B, C, S) with strides (stride_b, stride_c, stride_s)
    Y,  # output, x's shape, dtype and strides
    STAT,  # float32 (B, C, 2) from _finalize_kernel: mean and rstd * weight per channel
    Bias,  # bias (C,), read when HAS_B
    ADD,  # (B, C) in x's dtype, added to x before the norm, read when HAS_ADD
    C, S,  # channels, positions per channel
    stride_b, stride_c, stride_s,  # element strides of x and y over (B, C, S)
    stride_bias,  # element stride of bias
    stride_add_b, stride_add_c,  # element strides of add over (B, C)
    HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,  # tile, powers of two
):
    # Tiles are visited last first: the stats pass read them last, so they may still be in L2.
    n_c = tl.cdiv(C, BLOCK_C)
    n_s = tl.cdiv(S, BLOCK_S)
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    b = pid // (n_c * n_s)
    rest = pid % (n_c * n_s)
    c = (rest // n_s) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    s = (rest % n_s) * BLOCK_S + tl.arange(0, BLOCK_S)  # (BLOCK_S,)
    c_ok = c < C
    mask = c_ok[:, None] & (s < S)[None, :]
    stat = STAT + (b * C + c) * 2
    mean = tl.load(stat, mask=c_ok, other=0.0)
    scale = tl.load(stat + 1, mask=c_ok, other=0.0)
    offs = b.to(tl.int64) * stride_b + (c[:, None] * stride_c + s[None, :] * stride_s)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:  # masked elements are not stored
        x = _plus_channel_term(x, ADD, b, c, c_ok, stride_add_b, stride_add_c)
    y = (x - mean[:, None]) * scale[:, None]
    if HAS_B:
        y = y + tl.load(Bias + c * stride_bias, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)  # read once per device, not at every launch
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs are enough
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tile(cpg: int, s: int, channels_last: bool, limit: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S) of at most ``limit`` elements, long along the dimension memory runs along."""
    bc, bs = next_power_of_2(cpg), next_power_of_2(s)
    if channels_last:
        bc = min(bc, limit, MAX_TILE_C)
        return bc, min(bs, max(1, limit // bc))
    bs = min(bs, limit)
    return min(bc, max(1, limit // bs)), bs


def split_geometry(x: torch.Tensor, s: int, channels_last: bool, tile: int, programs_per_sm: int,
                   max_split: int) -> tuple[int, int, int, int, int]:
    """The split plan's grid over x (B, C, S): tiles of (block_c, block_s) within ``tile`` elements, n_c
    channel tiles, and each channel's S positions cut into ``split`` ranges of ``s_per_split`` (whole
    tiles; at most ``max_split``), enough that B * n_c * split programs fill ``programs_per_sm`` per SM.
    Returns (block_c, block_s, n_c, split, s_per_split); the backward's split plan uses it too."""
    batch, channels = x.shape[0], x.shape[1]
    block_c, block_s = _tile(channels, s, channels_last, tile)
    n_c = cdiv(channels, block_c)
    want = cdiv(programs_per_sm * _sm_count(x.device), batch * n_c)
    split = max(1, min(want, cdiv(s, block_s), max_split))
    s_per_split = cdiv(cdiv(s, split), block_s) * block_s  # whole tiles per range
    return block_c, block_s, n_c, cdiv(s, s_per_split), s_per_split


def padded_group_size(x: torch.Tensor, num_groups: int) -> int:
    """Elements of one (b, g) group padded to power-of-two tiles: next_pow2(C/G) * next_pow2(spatial)."""
    batch, channels = x.shape[0], x.shape[1]
    s = x.numel() // (batch * channels)
    return next_power_of_2(channels // num_groups) * next_power_of_2(s)


def fits_one_pass(x: torch.Tensor, num_groups: int) -> bool:
    """Whether a padded group of x fits in one program's registers."""
    return padded_group_size(x, num_groups) <= ONE_PASS_MAX


def plan(x: torch.Tensor, num_groups: int) -> str:
    """"one_pass" when a padded group fits in one program's registers, else "split"."""
    return "one_pass" if fits_one_pass(x, num_groups) else "split"


# launched through CachedKernel: Triton's launch path once per variant, then its compiled kernel directly
_ONE_PASS = CachedKernel(_one_pass_kernel)
_CHANNEL_STATS = CachedKernel(_channel_stats_kernel)
_FINALIZE = CachedKernel(_finalize_kernel)
_APPLY = CachedKernel(_apply_kernel)


def launch(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
           eps: float, silu: bool, channels_last: bool, out: torch.Tensor | None = None,
           force_plan: str | None = None, return_stats: bool = False, add: torch.Tensor | None = None):
    """y = group_norm(x) (+ SiLU) by the Triton kernels; x validated, non-empty and dense in the
    layout named; ``out`` (x's shape, dtype and strides) receives y if given. ``force_plan``
    ("one_pass" or "split"; for tests and benchmarks) overrides :func:`plan`. With
    ``return_stats`` the result is (y, mean, rstd), the last two float32 (B, G), written by the
    same kernels (no extra pass) for :mod:`group_norm_backward_triton`. ``add`` ((B, C), x's dtype, any
    strides), if given, is added to x per (batch item, channel) first, the sum rounded to x's dtype:
    y = group_norm(x + add[:, :, None, ...]) without that sum ever being written."""
    batch, channels = x.shape[0], x.shape[1]
    s = x.numel() // (batch * channels)
    cpg = channels // num_groups
    strides = (s * channels, 1, channels) if channels_last else (channels * s, s, 1)
    y = torch.empty_like(x) if out is None else out  # x is dense, so y gets its strides
    w = weight if weight is not None else x  # a placeholder pointer when absent
    bb = bias if bias is not None else x
    stride_w = w.stride(0) if weight is not None else 0
    stride_bias = bb.stride(0) if bias is not None else 0
    aa = add if add is not None else x
    stride_add = (add.stride(0), add.stride(1)) if add is not None else (0, 0)
    if return_stats:
        mean = torch.empty((batch, num_groups), dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
    else:
        mean = rstd = x  # placeholder pointers, never written (x, read-only: no alias of an output for Inductor)
    result = (y, mean, rstd) if return_stats else y
    which = force_plan or plan(x, num_groups)
    if which == "one_pass":
        full_c, full_s = next_power_of_2(cpg), next_power_of_2(s)
        if not fits_one_pass(x, num_groups):
            raise ValueError(f"group_norm: a group of {cpg} x {s} does not fit the one-pass plan")
        warps = min(16, max(1, full_c * full_s // ONE_PASS_ELEMS_PER_WARP))
        _ONE_PASS.launch(
            (batch * num_groups,),
            (x, y, w, bb, aa, mean, rstd, num_groups, cpg, s, *strides, stride_w, stride_bias, *stride_add, eps),
            dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_ADD=add is not None, SILU=silu,
                 WRITE_STATS=return_stats, BLOCK_C=full_c, BLOCK_S=full_s, num_warps=warps))
        return result
    # split: per-channel partial statistics, one merge per group, then the elementwise apply
    block_c, block_s, n_c, split, s_per_split = split_geometry(x, s, channels_last, TILE, PROGRAMS_PER_SM, MAX_SPLIT)
    part = scratch(x, "group_norm.part", batch * split * 2 * channels)  # (B, SPLIT, 2, C) float32
    stat = scratch(x, "group_norm.stat", batch * channels * 2)  # (B, C, 2) float32
    tile = dict(BLOCK_C=block_c, BLOCK_S=block_s, num_warps=TILE_WARPS)
    _CHANNEL_STATS.launch((n_c, split, batch), (x, aa, part, channels, s, s_per_split, split, *strides, *stride_add),
                          dict(HAS_ADD=add is not None, **tile))
    block_split = min(next_power_of_2(split), max(1, FINALIZE_TILE // next_power_of_2(cpg)))
    _FINALIZE.launch(
        (batch * num_groups,),
        (part, stat, w, mean, rstd, num_groups, cpg, channels, s, s_per_split, split, stride_w, eps),
        dict(HAS_W=weight is not None, WRITE_STATS=return_stats, BLOCK_SPLIT=block_split,
             BLOCK_C=next_power_of_2(cpg), num_warps=4))
    _APPLY.launch(
        (batch * n_c * cdiv(s, block_s),),
        (x, y, stat, bb, aa, channels, s, *strides, stride_bias, *stride_add),
        dict(HAS_B=bias is not None, HAS_ADD=add is not None, SILU=silu, **tile))
    return result
