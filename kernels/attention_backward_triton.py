"""Triton backward of :func:`fusediff.kernels.attention`: dq, dk, dv of out = softmax(q k^T * scale) v.

This is the backward of FlashAttention-2 (Dao 2023, arXiv:2307.08691, Algorithm 2), split into
three kernels so that every gradient element is written by one program (no float atomics: the
results are deterministic, bit for bit, from run to run):

1. ``_bwd_preprocess_kernel``: D_i = rowsum(dO_i * O_i) in float32                 (Alg. 2, line 4)
   of the float32 output O: for float16/bfloat16 the forward keeps, besides the rounded output, its
   rounding residual (``out_lo``; one more output-sized tensor, which FlashAttention-2 does not keep).
   D from the rounded output alone is off by about dO . O * 2^-8 (bfloat16); where P is nearly
   one-hot, dS = P (dP - D) is a small difference of such numbers, and in the tests (logits in the
   hundreds) bfloat16 dq came out wrong by 3 where it is 5e-5, far outside the house rule.
2. ``_bwd_dkdv_kernel``: one program per key tile K_j, V_j; it walks over all query tiles, recomputes
   P_ij = exp(S_ij - L_i) from q, k and the forward's log-sum-exp L, and accumulates
   dV_j += P_ij^T dO_i and dK_j += dS_ij^T Q_i, with dP_ij = dO_i V_j^T and
   dS_ij = P_ij * (dP_ij - D_i)                                                     (Alg. 2, lines 11-20)
3. ``_bwd_dq_kernel``: one program per query tile Q_i; it walks over all key tiles and accumulates
   dQ_i += dS_ij K_j (FlashAttention-2's dQ, without the atomic adds of line 21).

S_ij = scale * q_i . k_j are the natural logits; dq and dk get their factor ``scale`` once, at the end.
The log-sum-exp comes from the forward (attention_triton.launch(lse=...)) in base 2: L2_i =
log2(sum_j 2^(S_ij * log2 e)) = L_i * log2(e), so P_ij = exp2(q_i . k_j * scale * log2 e - L2_i), one
FMA and one exp2 per score, the same arithmetic as the forward. Accumulators, D and dP are float32; as
in FlashAttention, P and dS are rounded to the input dtype before they enter a product (the tensor
cores' input), each product accumulating in float32; each gradient is rounded once at the end.

Layout: q, k, v, o, dO and the three gradients are read and written through all four of their strides
(a (B, S, H, D) projection viewed with .transpose(1, 2) needs no copy; dO may be any view, e.g. the
expanded ones of ``out.sum().backward()``); batch and head offsets are int64. D is padded to BLOCK_D
(the next power of two >= 16) by masked loads, as in the forward. Query rows past Sq read q = dO = 0
and L = +inf, so their P is 0; key rows past Sk read 0, their dK, dV rows are not stored, and in the
dQ kernel their P is masked to 0 in the last, partial key tile.

Limits: float32 (IEEE products), float16, bfloat16; 1 <= D <= 256; Sq, Sk >= 1 (the caller handles
empty tensors); no mask, dropout or causal flag. Block sizes come from a small table per BLOCK_D
(``TUNING``; not autotuned), written for the H100 without measurements yet.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._backend import _interpreting
from ._launch import CachedKernel
from .attention_triton import LOG2E, MAX_HEAD_DIM, _load_tile, block_d

# per BLOCK_D: (BLOCK_M, BLOCK_N, num_warps, num_stages) of the dK/dV kernel, then of the dQ kernel.
# The dK/dV kernel keeps two (BLOCK_N, BLOCK_D) float32 accumulators and streams small query tiles;
# the dQ kernel keeps one (BLOCK_M, BLOCK_D) accumulator and streams small key tiles
# (FlashAttention-2's Triton backward uses the same asymmetry). At most 64 accumulator registers per thread.
TUNING = {
    16: ((32, 128, 4, 3), (128, 32, 4, 3)),
    32: ((32, 128, 4, 3), (128, 32, 4, 3)),
    64: ((32, 128, 8, 3), (128, 32, 8, 3)),
    128: ((32, 64, 8, 3), (64, 32, 4, 3)),
    256: ((16, 32, 8, 2), (32, 32, 4, 2)),
}
TUNING_FP32 = {  # float32: IEEE products on FMA units with operand tiles in registers, so small tiles
    16: ((32, 32, 4, 2), (32, 32, 4, 2)),
    32: ((32, 32, 4, 2), (32, 32, 4, 2)),
    64: ((32, 32, 4, 2), (32, 32, 4, 2)),
    128: ((16, 32, 4, 2), (32, 16, 4, 2)),
    256: ((16, 16, 4, 2), (16, 16, 4, 2)),
}
INTERPRETER_CONFIG = ((32, 32, 4, 1), (32, 32, 4, 1))  # TRITON_INTERPRET=1: any tile >= 16 works
PREPROCESS_BLOCK_M = 64  # query rows per program of the delta kernel


@triton.jit
def _bwd_preprocess_kernel(
    O, DO,  # the forward's output and its gradient, (B, H, Sq, D), any strides, one dtype
    O_LO,  # if HAS_O_LO: the output's rounding residual (B, H, Sq, D), O's dtype: out = O + O_LO
    Delta,  # output: D_i = rowsum(dO_i * O_i), float32 (B, H, Sq) contiguous
    stride_ob, stride_oh, stride_os, stride_od,  # element strides of o over (B, H, Sq, D)
    stride_lb, stride_lh, stride_ls, stride_ld,  # element strides of O_LO over (B, H, Sq, D)
    stride_dob, stride_doh, stride_dos, stride_dod,  # element strides of dO over (B, H, Sq, D)
    H,  # heads: a program's (b, h) is b * H + h
    SQ,  # query positions, >= 1
    HEAD_DIM: tl.constexpr,  # D, 1..256
    BLOCK_D: tl.constexpr,  # D padded to a power of two >= 16
    HAS_O_LO: tl.constexpr,  # O_LO is given (float16 and bfloat16 outputs)
    BLOCK_M: tl.constexpr,  # query rows per program
):
    tl.static_assert(HEAD_DIM <= BLOCK_D and BLOCK_D <= 256, "1 <= D <= BLOCK_D <= 256")
    n_m = tl.cdiv(SQ, BLOCK_M)
    pid = tl.program_id(0)
    start_m = (pid % n_m) * BLOCK_M
    bh = pid // n_m
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < SQ)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    if HAS_O_LO:
        o += tl.load(O_LO + b * stride_lb + h * stride_lh + offs_m[:, None] * stride_ls + offs_d[None, :] * stride_ld,
                     mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * SQ + offs_m, tl.sum(o * do, 1), mask=offs_m < SQ)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO,  # q, dO (B, H, Sq, D); k, v (B, H, Sk, D); any strides, one dtype
    LSE, Delta,  # float32 (B, H, Sq) contiguous: the forward's base-2 log-sum-exp L2 and D = rowsum(dO * O)
    DK, DV,  # outputs (B, H, Sk, D) in k's dtype, any strides
    stride_qb, stride_qh, stride_qs, stride_qd,  # element strides of q over (B, H, Sq, D)
    stride_kb, stride_kh, stride_ks, stride_kd,  # element strides of k over (B, H, Sk, D)
    stride_vb, stride_vh, stride_vs, stride_vd,  # element strides of v over (B, H, Sk, D)
    stride_dob, stride_doh, stride_dos, stride_dod,  # element strides of dO over (B, H, Sq, D)
    stride_dkb, stride_dkh, stride_dks, stride_dkd,  # element strides of dk over (B, H, Sk, D)
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,  # element strides of dv over (B, H, Sk, D)
    H,  # heads: a program's (b, h) is b * H + h
    SQ, SK,  # query and key positions, both >= 1
    scale,  # the attention scale (natural logits S = scale * q k^T): dK's final factor
    qk_scale,  # scale * log2(e): logits in base 2
    HEAD_DIM: tl.constexpr,  # D, 1..256
    BLOCK_D: tl.constexpr,  # D padded to a power of two >= 16
    INPUT_PRECISION: tl.constexpr,  # tl.dot's input_precision: "ieee" for float32 inputs
    DOT_IN_FP32: tl.constexpr,  # interpreter only: products in float32, since its bfloat16 dot is wrong
    BLOCK_M: tl.constexpr,  # query rows per step of the loop, a power of two >= 16
    BLOCK_N: tl.constexpr,  # keys per program, a power of two >= 16
):
    tl.static_assert(HEAD_DIM <= BLOCK_D and BLOCK_D <= 256, "1 <= D <= BLOCK_D <= 256")
    tl.static_assert(BLOCK_D >= 16 and BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs tiles of 16 or more")
    # programs are ordered key tile fastest, so neighbours share one head's queries in L2
    n_n = tl.cdiv(SK, BLOCK_N)
    pid = tl.program_id(0)
    start_n = (pid % n_n) * BLOCK_N
    bh = pid // n_n
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < SK
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    # 1. this program's K_j, V_j, kept in registers                            (BLOCK_N, BLOCK_D)
    k = _load_tile(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                   n_ok, d_ok, True, MASK_D)
    v = _load_tile(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                   n_ok, d_ok, True, MASK_D)
    if DOT_IN_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
    do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod
    row = bh.to(tl.int64) * SQ  # this (b, h)'s first entry of L2 and D
    # 2. every query tile Q_i, dO_i, L2_i, D_i; rows past Sq read 0 (L2 = +inf, so P = 0)
    for start_m in range(0, SQ, BLOCK_M):
        m_ok = start_m + offs_m < SQ
        q = _load_tile(q_ptrs, m_ok, d_ok, True, MASK_D)
        do = _load_tile(do_ptrs, m_ok, d_ok, True, MASK_D)
        lse = tl.load(LSE + row + start_m + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(Delta + row + start_m + offs_m, mask=m_ok, other=0.0)
        if DOT_IN_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # 3. P_ij = exp2(q k^T * scale * log2 e - L2_i), recomputed                 (BLOCK_M, BLOCK_N)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        # 4. dV_j += P^T dO_i, P rounded to the input dtype                         (BLOCK_N, BLOCK_D)
        dv = tl.dot(tl.trans(_operand(p, DV.dtype.element_ty, DOT_IN_FP32)), do, dv, input_precision=INPUT_PRECISION)
        # 5. dP = dO_i V_j^T, dS = P * (dP - D_i)                                    (BLOCK_M, BLOCK_N)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        # 6. dK_j += dS^T Q_i (the factor scale comes at the end)                   (BLOCK_N, BLOCK_D)
        dk = tl.dot(tl.trans(_operand(ds, DK.dtype.element_ty, DOT_IN_FP32)), q, dk, input_precision=INPUT_PRECISION)
        q_ptrs += BLOCK_M * stride_qs
        do_ptrs += BLOCK_M * stride_dos
    # 7. round once; key rows past Sk are not stored
    mask = n_ok[:, None] & d_ok[None, :]
    dk_ptrs = DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :] * stride_dvd
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _operand(x, DTYPE: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """x (float32) rounded to the input dtype, as a tensor-core operand; back in float32 under DOT_IN_FP32."""
    x = x.to(DTYPE)
    if DOT_IN_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _dq_tile(dq, q, do, k, v, lse, delta, n_ok, qk_scale, MASK_N: tl.constexpr, DTYPE: tl.constexpr,
             INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """dQ_i += dS_ij K_j for one key tile (the factor scale comes at the end); MASK_N: the partial last
    tile, whose missing keys get P = 0."""
    qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
    p = tl.math.exp2(qk * qk_scale - lse[:, None])
    if MASK_N:
        p = tl.where(n_ok[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(_operand(ds, DTYPE, DOT_IN_FP32), k, dq, input_precision=INPUT_PRECISION)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO,  # q, dO (B, H, Sq, D); k, v (B, H, Sk, D); any strides, one dtype
    LSE, Delta,  # float32 (B, H, Sq) contiguous: the forward's base-2 log-sum-exp L2 and D = rowsum(dO * O)
    DQ,  # output (B, H, Sq, D) in q's dtype, any strides
    stride_qb, stride_qh, stride_qs, stride_qd,  # element strides of q over (B, H, Sq, D)
    stride_kb, stride_kh, stride_ks, stride_kd,  # element strides of k over (B, H, Sk, D)
    stride_vb, stride_vh, stride_vs, stride_vd,  # element strides of v over (B, H, Sk, D)
    stride_dob, stride_doh, stride_dos, stride_dod,  # element strides of dO over (B, H, Sq, D)
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,  # element strides of dq over (B, H, Sq, D)
    H,  # heads: a program's (b, h) is b * H + h
    SQ, SK,  # query and key positions, both >= 1
    scale,  # the attention scale: dQ's final factor
    qk_scale,  # scale * log2(e): logits in base 2
    HEAD_DIM: tl.constexpr,  # D, 1..256
    BLOCK_D: tl.constexpr,  # D padded to a power of two >= 16
    INPUT_PRECISION: tl.constexpr,  # tl.dot's input_precision: "ieee" for float32 inputs
    DOT_IN_FP32: tl.constexpr,  # interpreter only: products in float32, since its bfloat16 dot is wrong
    BLOCK_M: tl.constexpr,  # query rows per program, a power of two >= 16
    BLOCK_N: tl.constexpr,  # keys per step of the loop, a power of two >= 16
):
    tl.static_assert(HEAD_DIM <= BLOCK_D and BLOCK_D <= 256, "1 <= D <= BLOCK_D <= 256")
    tl.static_assert(BLOCK_D >= 16 and BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs tiles of 16 or more")
    n_m = tl.cdiv(SQ, BLOCK_M)
    pid = tl.program_id(0)
    start_m = (pid % n_m) * BLOCK_M
    bh = pid // n_m
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < SQ
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    # 1. this program's Q_i, dO_i, L2_i, D_i, kept in registers; rows past Sq read 0 (L2 = +inf)
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                   m_ok, d_ok, True, MASK_D)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod,
                    m_ok, d_ok, True, MASK_D)
    lse = tl.load(LSE + bh.to(tl.int64) * SQ + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * SQ + offs_m, mask=m_ok, other=0.0)
    if DOT_IN_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
    # 2. whole key tiles, no key mask
    n_full = (SK // BLOCK_N) * BLOCK_N
    for _ in range(0, n_full, BLOCK_N):
        k = _load_tile(k_ptrs, offs_n, d_ok, False, MASK_D)
        v = _load_tile(v_ptrs, offs_n, d_ok, False, MASK_D)
        if DOT_IN_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        dq = _dq_tile(dq, q, do, k, v, lse, delta, offs_n, qk_scale, False, DQ.dtype.element_ty,
                      INPUT_PRECISION, DOT_IN_FP32)
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    # 3. the partial last key tile, if any: missing keys read 0 and get P = 0
    if n_full < SK:
        n_ok = n_full + offs_n < SK
        k = _load_tile(k_ptrs, n_ok, d_ok, True, MASK_D)
        v = _load_tile(v_ptrs, n_ok, d_ok, True, MASK_D)
        if DOT_IN_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        dq = _dq_tile(dq, q, do, k, v, lse, delta, n_ok, qk_scale, True, DQ.dtype.element_ty,
                      INPUT_PRECISION, DOT_IN_FP32)
    # 4. dQ = scale * sum_j dS_ij K_j, rounded once; rows past Sq are not stored
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def configs_for(head_dim: int, element_size: int) -> tuple[tuple, tuple]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the dK/dV kernel and of the dQ kernel for head size D."""
    if _interpreting():
        return INTERPRETER_CONFIG
    return (TUNING_FP32 if element_size == 4 else TUNING)[block_d(head_dim)]


def _grad_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised gradient for ``t``: t's strides where t is dense (torch.empty_like), else contiguous."""
    return torch.empty_like(t)


# launched through CachedKernel: Triton's launch path once per variant, then its compiled kernel directly
_PREPROCESS = CachedKernel(_bwd_preprocess_kernel)
_DKDV = CachedKernel(_bwd_dkdv_kernel)
_DQ = CachedKernel(_bwd_dq_kernel)


def launch(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
           lse: torch.Tensor, scale: float, out_lo: torch.Tensor | None = None, config: tuple | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of attention(q, k, v, scale) = o for the output gradient ``do``, by the Triton kernels.

    ``lse`` is the forward's float32 (B, H, Sq) contiguous base-2 log-sum-exp (attention_triton.launch(
    lse=...)); ``out_lo`` its rounding residual (launch(out_lo=...)), if kept, so that D = rowsum(dO * out)
    is taken of the float32 output rather than of o, which is rounded. Inputs validated by the caller: one
    dtype (float32, float16, bfloat16) and device, 1 <= D <= 256,
    Sq, Sk >= 1. Each gradient has its input's shape and dtype, and its strides where the input is dense
    (a transposed (B, S, H, D) view gets a gradient laid out the same way), else is contiguous.
    ``config`` ((BLOCK_M, BLOCK_N, num_warps, num_stages) for the dK/dV kernel and for the dQ kernel; for
    tests) replaces the table.
    """
    batch, heads, sq, head_dim = q.shape
    sk = k.shape[2]
    if not (1 <= head_dim <= MAX_HEAD_DIM and sk >= 1 and q.numel() > 0):
        raise ValueError(f"attention backward: the Triton kernels need 1 <= D <= {MAX_HEAD_DIM}, Sk >= 1 and a "
                         f"non-empty q; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if lse.shape != (batch, heads, sq) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"attention backward: lse must be float32 contiguous of shape {(batch, heads, sq)}; "
                         f"got {lse.dtype} {tuple(lse.shape)}")
    if do.shape != q.shape or o.shape != q.shape or (out_lo is not None and out_lo.shape != q.shape):
        raise ValueError(f"attention backward: do and o must have q's shape {tuple(q.shape)}; "
                         f"got {tuple(do.shape)} and {tuple(o.shape)}")
    interpreting = _interpreting()
    dkdv_cfg, dq_cfg = config if config is not None else configs_for(head_dim, q.element_size())
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim))
    meta = dict(common, INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                DOT_IN_FP32=interpreting and q.dtype == torch.bfloat16)
    # 1. D = rowsum(dO * O)                                                     (B, H, Sq) float32
    delta = torch.empty((batch, heads, sq), dtype=torch.float32, device=q.device)
    grid = (math.ceil(sq / PREPROCESS_BLOCK_M) * batch * heads,)
    lo = o if out_lo is None else out_lo  # a placeholder pointer without a residual
    _PREPROCESS.launch(
        grid,
        (o, do, lo, delta, *o.stride(), *lo.stride(), *do.stride(), heads, sq),
        dict(**common, HAS_O_LO=out_lo is not None, BLOCK_M=PREPROCESS_BLOCK_M))
    dq, dk, dv = _grad_like(q), _grad_like(k), _grad_like(v)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    scales = (float(scale), float(scale) * LOG2E)
    # 2. dK, dV: one program per key tile
    bm, bn, warps, stages = dkdv_cfg
    _DKDV.launch(
        (math.ceil(sk / bn) * batch * heads,),
        (q, k, v, do, lse, delta, dk, dv, *strides, *dk.stride(), *dv.stride(), heads, sq, sk, *scales),
        dict(**meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages))
    # 3. dQ: one program per query tile
    bm, bn, warps, stages = dq_cfg
    _DQ.launch(
        (math.ceil(sq / bm) * batch * heads,),
        (q, k, v, do, lse, delta, dq, *strides, *dq.stride(), heads, sq, sk, *scales),
        dict(**meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages))
    return dq, dk, dv
