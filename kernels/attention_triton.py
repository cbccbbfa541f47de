"""Triton forward of :func:`fusediff.kernels.attention`: flash attention without a mask.

out = softmax(q k^T * scale) v per (batch item, head), never materialising the (Sq, Sk) scores.
This is the tiled forward of FlashAttention (Dao et al. 2022, arXiv:2205.14135, Algorithm 1)
with the loop order of FlashAttention-2 (Dao 2023, arXiv:2307.08691, Sec. 3.1): one program
owns BLOCK_M query rows, loads them once and keeps them in registers, and walks over the keys
in tiles of BLOCK_N. The softmax is the online softmax of Milakov & Gimelshein (2018,
arXiv:1805.02867): per row a running maximum m and a running sum l of exp(s - m); when a tile
raises m, l and the output accumulator are rescaled by exp(m_old - m_new) (FlashAttention's
diag(e^{m - m_new}) factor). Logits are kept in base 2, s = q k^T * scale * log2(e), so that every
exponential is one exp2. The accumulator, m and l are float32; the output is divided by l and
rounded once to the input dtype at the end. As in FlashAttention, the probabilities are rounded
to the input dtype before the second product (p v), which runs on the tensor cores with a
float32 accumulator.

Layout: q, k and v are read where they lie through all four of their strides (a (B, S, H, D)
projection viewed as (B, H, S, D) with .transpose(1, 2), or a slice of a fused qkv tensor, needs
no copy); batch and head offsets are int64, and tiles advance by pointer increments, so only
offsets inside one tile are int32. The head size D is padded to BLOCK_D = next power of two
(>= 16) inside the kernel by masked loads, never by copying. Key tiles that lie wholly inside
Sk run unmasked; only the last, partial tile masks its scores to -inf. Query rows past Sq are
computed on zeros and not stored.

Tuning: block sizes, warps and pipeline stages come from ``TUNING``, a table per BLOCK_D
written for Hopper (H100), clamped to the problem and filtered by register and shared-memory
budgets in :func:`configs_for`; ``triton.autotune`` picks among them per (BLOCK_D, Sq bucket,
Sk bucket, dtype). Under TRITON_INTERPRET=1 (CPU tests) the kernel runs with ``INTERPRETER_CONFIG``
and no tuning. Loop warp specialization (``tl.range(..., warp_specialize=True)``) is in the
space only when ``FUSEDIFF_ATTENTION_WARP_SPECIALIZE=1`` and the device is sm_90 or newer.

Backward: with ``lse=`` the kernel also stores each row's log-sum-exp, in base 2 like its logits
(L2 = m + log2(l), the natural log-sum-exp times log2(e)), one float32 per row, which
attention_backward_triton.py reads to recompute P; with ``out_lo=`` also the output's rounding
residual (see attention_backward_triton.py); without them nothing more is stored (constexprs).

Limits: float32, float16 and bfloat16 (float32
products are IEEE, not TF32); 1 <= D <= 256; Sk >= 1 and no empty tensors (the caller handles
those); no mask, dropout or causal flag.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._backend import _interpreting
from ._launch import CachedKernel, cdiv, next_power_of_2

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per BLOCK_D, for the Hopper tensor cores (wgmma):
# 128 query rows per program with 4 or 8 warps where the float32 accumulator fits, 2-4 stages of
# K/V tiles in flight (cp.async), smaller query or key tiles as D grows. Every 16-bit row compiles
# for sm_90 without register spills (checked offline with Triton's ptxas; rows that spilled,
# e.g. 128x64 with 4 warps at BLOCK_D 128, were dropped).
TUNING = {
    16: [(128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 4, 4), (64, 128, 4, 3), (64, 64, 4, 4)],
    32: [(128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 4, 4), (64, 128, 4, 3), (64, 64, 4, 4)],
    64: [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 3), (128, 128, 8, 4), (64, 64, 4, 3)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (128, 32, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    256: [(64, 32, 4, 3), (128, 32, 8, 2), (128, 32, 8, 3), (64, 64, 8, 2), (64, 32, 8, 3)],
}
# float32 inputs: IEEE products are FMA loops, not tensor-core instructions, and their operand
# tiles live in registers, so small tiles for every head size (they still spill above BLOCK_D 64).
TUNING_FP32 = [(32, 32, 4, 2), (32, 32, 8, 2), (64, 32, 8, 2), (64, 64, 8, 2)]
ACC_REGS_PER_THREAD = 128  # the float32 accumulator may take at most this many registers per thread
SMEM_BYTES = 227 * 1024  # shared memory one program may use on sm_90 (H100)
SEQ_BUCKETS = (16, 64, 128, 512, 2048, 8192)  # autotune key: the first bucket >= S (longer: the last)
INTERPRETER_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)  # TRITON_INTERPRET=1: no tuning
WARP_SPECIALIZE_ENV = "FUSEDIFF_ATTENTION_WARP_SPECIALIZE"


@triton.jit
def _load_tile(ptrs, row_ok, d_ok, MASK_ROWS: tl.constexpr, MASK_D: tl.constexpr):
    """A (rows, BLOCK_D) tile; lanes masked off (rows past S, columns past D) read 0."""
    if MASK_ROWS and MASK_D:
        tile = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    elif MASK_ROWS:
        tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif MASK_D:
        tile = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _aligned(a, b, c, d, ALIGN: tl.constexpr):
    """Strides the host found to be multiples of ALIGN, rewritten as x // ALIGN * ALIGN (the same
    values) so that the compiler sees it too and can load 16 bytes at a time when D % 16 != 0."""
    return a // ALIGN * ALIGN, b // ALIGN * ALIGN, c // ALIGN * ALIGN, d // ALIGN * ALIGN


@triton.jit
def _attend_tile(
    acc, m_i, l_i,  # running (BLOCK_M, BLOCK_D) float32 output, (BLOCK_M,) maximum and sum, base 2
    q,  # (BLOCK_M, BLOCK_D) query tile, in registers
    k, v,  # (BLOCK_N, BLOCK_D) key and value tiles in the input dtype
    n_ok,  # (BLOCK_N,) which keys exist; read only when MASK_N
    qk_scale,  # scale * log2(e)
    MASK_N: tl.constexpr,  # the last, partial key tile: scores of missing keys become -inf
    NEG_SCALE: tl.constexpr,  # qk_scale < 0: the largest logit comes from the smallest q.k
    INPUT_PRECISION: tl.constexpr,  # tl.dot's input_precision: "ieee" for float32 inputs
    DOT_IN_FP32: tl.constexpr,  # products on float32 copies of k, v and p (see the kernel)
):
    if DOT_IN_FP32:
        k = k.to(tl.float32)
    # 1. logits of this tile in base 2: s = q k^T * scale * log2(e)          (BLOCK_M, BLOCK_N)
    qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    # 2. the new running maximum m_new = max(m, rowmax(s)), and p = exp2(s - m_new)
    if MASK_N:
        s = tl.where(n_ok[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
    else:
        if NEG_SCALE:
            row_max = tl.min(qk, 1) * qk_scale
        else:
            row_max = tl.max(qk, 1) * qk_scale
        m_new = tl.maximum(m_i, row_max)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])  # one FMA and one exp2 per score
    # 3. rescale what was summed under the old maximum: alpha = exp2(m - m_new) (0 on the first tile)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    # 4. acc += p v, p rounded to the input dtype as the tensor cores take it
    p = p.to(v.dtype)
    if DOT_IN_FP32:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = tl.dot(p, v, acc, input_precision=INPUT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attention_fwd_kernel(
    Q, K, V,  # inputs: q (B, H, Sq, D), k and v (B, H, Sk, D), any strides, one dtype
    O,  # output (B, H, Sq, D) in q's dtype
    LSE,  # output if WRITE_LSE: float32 (B, H, Sq) contiguous, the base-2 log-sum-exp of each row's logits
    O_LO,  # output if WRITE_O_LO: (B, H, Sq, D) in q's dtype with O's strides, the rounding residual of O
    stride_qb, stride_qh, stride_qs, stride_qd,  # element strides of q over (B, H, Sq, D)
    stride_kb, stride_kh, stride_ks, stride_kd,  # element strides of k over (B, H, Sk, D)
    stride_vb, stride_vh, stride_vs, stride_vd,  # element strides of v over (B, H, Sk, D)
    stride_ob, stride_oh, stride_os, stride_od,  # element strides of the output over (B, H, Sq, D)
    H,  # heads: a program's (b, h) is b * H + h
    SQ, SK,  # query and key positions, both >= 1
    qk_scale,  # the attention scale times log2(e): logits in base 2
    SQ_BUCKET, SK_BUCKET,  # read only by the autotuner: its key and its filter
    HEAD_DIM: tl.constexpr,  # D, the head size, 1..256
    BLOCK_D: tl.constexpr,  # D padded to a power of two >= 16
    NEG_SCALE: tl.constexpr,  # the scale is negative
    INPUT_PRECISION: tl.constexpr,  # tl.dot's input_precision: "ieee" for float32, "tf32" (unused) else
    DOT_IN_FP32: tl.constexpr,  # interpreter only: products in float32, since its bfloat16 dot is wrong
    ALIGN: tl.constexpr,  # every stride but the four of D is a multiple of ALIGN elements (a power of two)
    BLOCK_M: tl.constexpr,  # query rows per program, a power of two >= 16
    BLOCK_N: tl.constexpr,  # keys per tile, a power of two >= 16
    WARP_SPECIALIZE: tl.constexpr,  # warp-specialize the key loop (Hopper and newer, opt-in)
    WRITE_LSE: tl.constexpr,  # also store L2 = m + log2(l) per row, for the backward
    WRITE_O_LO: tl.constexpr,  # also store out - round(out), for the backward's D = rowsum(dO * out)
):
    tl.static_assert(HEAD_DIM <= BLOCK_D, "BLOCK_D must hold the head size")
    tl.static_assert(BLOCK_D <= 256, "head sizes above 256 go to the reference")
    tl.static_assert(BLOCK_D >= 16 and BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs tiles of 16 or more")
    if ALIGN > 1:
        stride_qb, stride_qh, stride_qs, stride_ob = _aligned(stride_qb, stride_qh, stride_qs, stride_ob, ALIGN)
        stride_kb, stride_kh, stride_ks, stride_oh = _aligned(stride_kb, stride_kh, stride_ks, stride_oh, ALIGN)
        stride_vb, stride_vh, stride_vs, stride_os = _aligned(stride_vb, stride_vh, stride_vs, stride_os, ALIGN)
    # programs are ordered query tile fastest, so neighbours share one head's keys and values in L2
    n_m = tl.cdiv(SQ, BLOCK_M)
    pid = tl.program_id(0)
    start_m = (pid % n_m) * BLOCK_M
    bh = pid // n_m
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = start_m + offs_m < SQ
    # 1. this program's query tile, loaded once and kept in registers        (BLOCK_M, BLOCK_D)
    q_ptrs = Q + b * stride_qb + h * stride_qh + start_m.to(tl.int64) * stride_qs
    q = _load_tile(q_ptrs + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, m_ok, d_ok,
                   True, HEAD_DIM != BLOCK_D)
    if DOT_IN_FP32:
        q = q.to(tl.float32)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
    # 2. running statistics in float32: maximum m (base 2), sum l, and the output accumulator
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # 3. whole key tiles, no key mask
    n_full = (SK // BLOCK_N) * BLOCK_N
    for _ in tl.range(0, n_full, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = _load_tile(k_ptrs, offs_n, d_ok, False, HEAD_DIM != BLOCK_D)
        v = _load_tile(v_ptrs, offs_n, d_ok, False, HEAD_DIM != BLOCK_D)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k, v, offs_n, qk_scale,
                                     False, NEG_SCALE, INPUT_PRECISION, DOT_IN_FP32)
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    # 4. the partial last tile, if any: missing keys read 0 and score -inf
    if n_full < SK:
        n_ok = n_full + offs_n < SK
        k = _load_tile(k_ptrs, n_ok, d_ok, True, HEAD_DIM != BLOCK_D)
        v = _load_tile(v_ptrs, n_ok, d_ok, True, HEAD_DIM != BLOCK_D)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k, v, n_ok, qk_scale,
                                     True, NEG_SCALE, INPUT_PRECISION, DOT_IN_FP32)
    # 5. normalise (l >= 1: the maximal key contributes exp2(0)) and round once; rows past Sq are dropped
    out = acc / l_i[:, None]
    o_offs = b * stride_ob + h * stride_oh + start_m.to(tl.int64) * stride_os
    o_offs += offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    o_mask = m_ok[:, None] & d_ok[None, :]
    rounded = out.to(O.dtype.element_ty)
    tl.store(O + o_offs, rounded, mask=o_mask)
    if WRITE_O_LO:  # what the rounding lost, itself rounded: out = rounded + lo to about 2^-16 relative
        tl.store(O_LO + o_offs, (out - rounded.to(tl.float32)).to(O.dtype.element_ty), mask=o_mask)
    # 6. for the backward: L2 = log2(sum_j exp2(s_j)) = m + log2(l), natural log-sum-exp times log2(e)
    if WRITE_LSE:
        tl.store(LSE + bh.to(tl.int64) * SQ + start_m + offs_m, m_i + tl.math.log2(l_i), mask=m_ok)


def block_d(head_dim: int) -> int:
    """BLOCK_D for head size D: the next power of two, at least 16 (tl.dot's smallest K)."""
    return max(16, next_power_of_2(head_dim))


def stride_align(element_size: int, *tensors: torch.Tensor) -> int:
    """The largest power of two, at most 16 bytes' worth of elements, dividing every stride but D's."""
    align = 16 // element_size
    while align > 1 and any(st % align for t in tensors for st in t.stride()[:3]):
        align //= 2
    return align


def seq_bucket(s: int) -> int:
    """The autotune bucket of a sequence length: the first of SEQ_BUCKETS >= s, else the last."""
    return next((b for b in SEQ_BUCKETS if s <= b), SEQ_BUCKETS[-1])


def _warp_specialize_allowed() -> bool:
    if os.environ.get(WARP_SPECIALIZE_ENV, "0").strip().lower() not in ("1", "true", "yes", "on"):
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def configs_for(bd: int, sq_bucket: int, sk_bucket: int, element_size: int) -> list[triton.Config]:
    """The tuning space of one BLOCK_D: TUNING's rows (TUNING_FP32's for float32) clamped to the problem,
    filtered, deduplicated.

    Tiles shrink to the (power-of-two, >= 16) bucket of short sequences; a row is dropped when its
    float32 accumulator would need more than ACC_REGS_PER_THREAD registers per thread or its
    q tile plus ``num_stages`` K and V tiles exceed SMEM_BYTES. The first row always survives.
    """
    rows = []
    for i, (bm, bn, warps, stages) in enumerate(TUNING_FP32 if element_size == 4 else TUNING[bd]):
        bm, bn = min(bm, max(16, sq_bucket)), min(bn, max(16, sk_bucket))
        acc_regs = bm * bd // (32 * warps)
        smem = (bm * bd + stages * 2 * bn * bd) * element_size
        if i > 0 and (acc_regs > ACC_REGS_PER_THREAD or smem > SMEM_BYTES):
            continue
        if (bm, bn, warps, stages) not in rows:
            rows.append((bm, bn, warps, stages))
    specialize = [False, True] if _warp_specialize_allowed() else [False]
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, WARP_SPECIALIZE=ws), num_warps=warps, num_stages=stages)
            for bm, bn, warps, stages in rows for ws in specialize]


def _prune(configs, named_args, **kwargs):
    """autotune's early_config_prune: the space of this call's BLOCK_D (the full list is a union)."""
    args = {**named_args, **kwargs}
    return configs_for(args["BLOCK_D"], args["SQ_BUCKET"], args["SK_BUCKET"], args["Q"].element_size())


_ALL_CONFIGS = [c for bd in TUNING for c in configs_for(bd, SEQ_BUCKETS[-1], SEQ_BUCKETS[-1], 2)]
_tuned_kernel = triton.autotune(configs=_ALL_CONFIGS, key=["BLOCK_D", "SQ_BUCKET", "SK_BUCKET"],
                                prune_configs_by={"early_config_prune": _prune})(_attention_fwd_kernel)


# launched through CachedKernel: Triton's launch path once per variant, then its compiled kernel directly
_FWD = CachedKernel(_attention_fwd_kernel)
_TUNED = CachedKernel(_tuned_kernel)


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, out: torch.Tensor | None = None,
           config: dict | None = None, *, lse: torch.Tensor | None = None,
           out_lo: torch.Tensor | None = None) -> torch.Tensor:
    """out = attention(q, k, v, scale) by the Triton kernel; inputs validated, 1 <= D <= 256, Sk >= 1 and
    none empty. ``out`` ((B, H, Sq, D), q's dtype, any strides) receives the result if given, else a
    contiguous tensor is allocated. ``lse`` (float32 (B, H, Sq) contiguous), if given, receives each
    row's log-sum-exp in base 2, log2(sum_j exp(scale * q_i . k_j)) (the natural one times log2(e)),
    which the backward (attention_backward_triton.launch) reads; ``out_lo`` (out's dtype, shape and strides),
    if given, receives out's rounding residual (float32 out minus the stored out, rounded), from which the
    backward's D = rowsum(dO * out) is exact to float32. Without them the kernel stores nothing more.
    ``config`` (BLOCK_M, BLOCK_N, num_warps, num_stages; for tests and benchmarks) skips the autotuner."""
    batch, heads, sq, head_dim = q.shape
    sk = k.shape[2]
    if not (1 <= head_dim <= MAX_HEAD_DIM and sk >= 1 and q.numel() > 0):
        raise ValueError(f"attention: the Triton kernel needs 1 <= D <= {MAX_HEAD_DIM}, Sk >= 1 and a non-empty q; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if out is None:
        out = torch.empty((batch, heads, sq, head_dim), dtype=q.dtype, device=q.device)  # (B, H, Sq, D)
    if lse is not None and (lse.shape != (batch, heads, sq) or lse.dtype != torch.float32 or not lse.is_contiguous()):
        raise ValueError(f"attention: lse must be float32 contiguous of shape {(batch, heads, sq)}; "
                         f"got {lse.dtype} {tuple(lse.shape)}")
    interpreting = _interpreting()
    if out_lo is not None and (out_lo.dtype != q.dtype or out_lo.shape != out.shape or out_lo.stride() != out.stride()):
        raise ValueError("attention: out_lo must have out's dtype, shape and strides")
    # placeholder pointers for the outputs not asked for (their constexpr flag keeps them untouched): q, which
    # is only read, so that no output is passed twice (Inductor would see an alias of what the kernel writes)
    lse_arg, lo_arg = q if lse is None else lse, q if out_lo is None else out_lo
    args = (q, k, v, out, lse_arg, lo_arg, *q.stride(), *k.stride(), *v.stride(), *out.stride(), heads, sq, sk,
            float(scale) * LOG2E, seq_bucket(sq), seq_bucket(sk))
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), NEG_SCALE=scale < 0,
                INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                DOT_IN_FP32=interpreting and q.dtype == torch.bfloat16,
                ALIGN=stride_align(q.element_size(), q, k, v, out), WRITE_LSE=lse is not None,
                WRITE_O_LO=out_lo is not None)
    if config is None and interpreting:
        config = INTERPRETER_CONFIG
    if config is not None:
        grid = (math.ceil(sq / config["BLOCK_M"]) * batch * heads,)
        _FWD.launch(
            grid,
            args,
            dict(**meta, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
                 WARP_SPECIALIZE=config.get("WARP_SPECIALIZE", False), num_warps=config.get("num_warps", 4),
                 num_stages=config.get("num_stages", 2)))
    else:
        _TUNED.launch(lambda m: (cdiv(sq, m["BLOCK_M"]) * batch * heads,), args, meta)
    return out
