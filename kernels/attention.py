"""Scaled dot-product attention without a mask: softmax(q k^T * scale) v per batch item and head.

    scores = q @ k^T * scale          (B, H, Sq, Sk),  scale = 1/sqrt(D) by default
    p      = softmax(scores, dim=-1)  over the Sk keys
    out    = p @ v                    (B, H, Sq, D)

This is eq. (1) of Vaswani et al., "Attention Is All You Need" (NeurIPS 2017,
arXiv:1706.03762), the self- and cross-attention of diffusion UNets and DiTs. It equals
torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale) with no mask and no
dropout.

Precision: both products and the softmax in float32 (float64 for float64 input), the softmax
with its row maximum subtracted, so large logits neither overflow nor underflow; one rounding
to q's dtype at the end.

Limits: q, k and v share batch B, heads H, head size D >= 1, dtype (float32, float16,
bfloat16 or float64) and device; k and v share Sk. Any strides are accepted, e.g. a (B, S, H, D)
projection viewed with .transpose(1, 2). The output is contiguous (B, H, Sq, D), or with
``out_layout="bshd"`` laid out as (B, Sq, H, D) in memory, FlashAttention's layout: then
``out.transpose(1, 2).reshape(B, Sq, H * D)``, the merge of the heads before the output
projection, is a view rather than a copy. With no keys (Sk = 0) the output is zeros, as in
torch. The Triton kernel takes head sizes up to MAX_FUSED_HEAD_DIM (256); larger float16 and
bfloat16 heads on CUDA, e.g. the single 512-wide head of SD's VAE mid-block, run torch's SDPA
(below); the rest run the reference, which materialises the float32 scores of as many query
rows at a time as fit in REF_SCORE_BYTES (256 MiB; every row's softmax is its own, so the
chunks give the same rows), bounding its memory, e.g. for that VAE head at 1024x1024. No
mask, dropout, causal flag or grouped-query heads. Gradients flow through plain torch ops.

Dispatch (DESIGN.md, decision 2): the flash-attention Triton kernel of ``attention_triton.py``
runs on CUDA tensors (and, with ``FUSEDIFF_KERNELS=fused`` and ``TRITON_INTERPRET=1``, on CPU
tensors) that are float32, float16 or bfloat16 with any strides and 1 <= D <= 256. Head sizes
D > 256 in float16 or bfloat16 on CUDA (not ROCm) take a second fused path,
``torch.nn.functional.scaled_dot_product_attention``, where its memory-efficient backend takes
the inputs (D a multiple of 8, unit stride along D, 16-byte aligned storage offsets) and the
scale is >= 0 (:func:`_use_sdpa`). Per PyTorch's dispatcher
(aten/src/ATen/native/transformers/cuda/sdp_utils.cpp) FlashAttention takes D <= 256 and cuDNN
D <= 256 (sm90/sm100 with cuDNN > 9.22, else 128), so the memory-efficient CUTLASS kernel runs
(xFormers' FMHA; any D, sm50 to sm121): both products on tensor cores with float32
accumulation, an online softmax in float32, p rounded to the input dtype before p v (as in
FlashAttention), one final rounding, no scores in memory; within DESIGN.md's tolerance rule.
Inputs it does not take would get SDPA's math backend, which upcasts to float32 and
materialises every score, the reference without its memory bound: they run the reference.
(With the memory-efficient backend switched off, torch.backends.cuda.enable_mem_efficient_sdp,
SDPA runs its math backend for those calls.) float64, the other D > 256 cases, no keys
(Sk = 0), empty tensors and calls that need gradients run the reference;
``FUSEDIFF_KERNELS=ref`` runs it always. Under ``torch.compile`` the Triton kernel is reached
through the custom op ``torch.ops.fusediff.attention``; SDPA is traced as itself.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
import torch.nn.functional as F

from . import _backend

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_DTYPES = _FUSED_DTYPES + (torch.float64,)
MAX_FUSED_HEAD_DIM = 256  # the Triton kernel's largest head size; larger ones run SDPA or the reference
_SDPA_DTYPES = (torch.float16, torch.bfloat16)  # D > 256 on CUDA: torch's SDPA for these dtypes
SDPA_ALIGN_ELEMENTS = 8  # the memory-efficient SDPA kernel's D must be a multiple of this (fp16/bf16)
SDPA_ALIGN_BYTES = 16  # ... and its q, k, v storage offsets a multiple of this many bytes
OUT_LAYOUTS = ("bhsd", "bshd")  # memory order of the (B, H, Sq, D) output: contiguous, or heads innermost
REF_SCORE_BYTES = 256 << 20  # the reference's scores (B, H, rows, Sk) are at most this big at a time


def _validate(q, k, v, scale, out_layout="bhsd") -> float:
    """Raise TypeError/ValueError naming the argument; return the scale to use."""
    if out_layout not in OUT_LAYOUTS:
        raise ValueError(f"attention: out_layout must be one of {', '.join(OUT_LAYOUTS)}; got {out_layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must have shape (B, H, S, D), 4-D; got shape {tuple(t.shape)}")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"attention: q must be float32, float16, bfloat16 or float64; got {q.dtype}")
    batch, heads, _, head_dim = q.shape
    if head_dim == 0:
        raise ValueError("attention: head size D must be at least 1; got q of shape "
                         f"{tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"attention: {name} is {t.dtype}, q is {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"attention: {name} is on {t.device}, q is on {q.device}")
        if t.shape[0] != batch or t.shape[1] != heads or t.shape[3] != head_dim:
            raise ValueError(
                f"attention: {name} has shape {tuple(t.shape)}; with q of shape {tuple(q.shape)} it must "
                f"be ({batch}, {heads}, Sk, {head_dim}) (same B, H and D)")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"attention: k has Sk={k.shape[2]} keys, v has {v.shape[2]}; they must match")
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"attention: scale must be a float or None; got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"attention: scale must be finite; got {scale}")
    return float(scale)


def _empty_out(q: torch.Tensor, out_layout: str) -> torch.Tensor:
    """An uninitialised (B, H, Sq, D) output of q's dtype and device in ``out_layout``'s memory order."""
    batch, heads, sq, head_dim = q.shape
    if out_layout == "bshd":
        return q.new_empty((batch, sq, heads, head_dim)).transpose(1, 2)  # (B, H, Sq, D) view of (B, Sq, H, D)
    return q.new_empty((batch, heads, sq, head_dim))


def _ref(q, k, v, scale, out_layout="bhsd"):
    """attention_ref on inputs already validated, with the scale resolved: in chunks of query rows
    whose scores fit in REF_SCORE_BYTES."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, heads, sq, _ = q.shape
    row_bytes = batch * heads * k.shape[2] * (8 if compute == torch.float64 else 4)
    rows = max(1, REF_SCORE_BYTES // max(row_bytes, 1))
    kt, vc = k.to(compute).transpose(-2, -1), v.to(compute)  # (B, H, D, Sk), (B, H, Sk, D)
    if sq <= rows:
        out = _ref_rows(q, kt, vc, scale)  # (B, H, Sq, D) contiguous
        return out if out_layout == "bhsd" else _empty_out(q, out_layout).copy_(out)
    out = _empty_out(q, out_layout)
    for i in range(0, sq, rows):
        out[:, :, i:i + rows] = _ref_rows(q[:, :, i:i + rows], kt, vc, scale)
    return out


def _ref_rows(q, kt, v, scale):
    """softmax(q k^T * scale) v for a block of query rows, k^T and v already in the compute dtype."""
    scores = torch.matmul(q.to(kt.dtype), kt) * scale  # (B, H, rows, Sk)
    probs = torch.softmax(scores, dim=-1)  # rows sum to 1
    return torch.matmul(probs, v).to(q.dtype)  # (B, H, rows, D)


def _kernels() -> ModuleType:
    return _backend.triton_module("attention")


def _use_fused(q: torch.Tensor, tensors) -> bool:
    """Whether this call runs the Triton kernel (shape aside): DESIGN.md decision 2, no autograd."""
    return _backend.use_triton(q, _FUSED_DTYPES, tensors)


def _fused_shape(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the kernel covers these sizes: some queries and keys, 1 <= D <= 256."""
    return q.numel() > 0 and k.numel() > 0 and q.shape[3] <= MAX_FUSED_HEAD_DIM


def _fused(q, k, v, scale, out_layout):
    if torch.compiler.is_compiling():
        return torch.ops.fusediff.attention(q, k, v, scale, out_layout == "bshd")
    return _kernels().launch(q, k, v, scale, out=_empty_out(q, out_layout))


def _use_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> bool:
    """Whether a call with D > MAX_FUSED_HEAD_DIM runs torch's SDPA: not under the ref backend, CUDA
    (not ROCm) float16/bfloat16 tensors with some queries and keys, no autograd, a scale >= 0, and
    inputs that SDPA's memory-efficient backend takes (sdp_utils.cpp: check_head_dim_size_mem_efficient,
    check_last_dim_stride_equals_1_dense, check_data_ptr_alignment_mem_efficient), so that its math
    backend, which materialises every score, does not run in place of the chunked reference.

    The scale must not be negative: that kernel subtracts (row max of q k^T) * scale, which for a
    negative scale is the row's smallest scaled logit, and its exponentials can overflow."""
    if _backend.get_backend() == "ref" or not q.is_cuda or torch.version.hip is not None:
        return False
    if q.dtype not in _SDPA_DTYPES or scale < 0 or q.numel() == 0 or k.numel() == 0:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return False
    if q.shape[3] % SDPA_ALIGN_ELEMENTS != 0 or any(t.stride(3) != 1 for t in (q, k, v)):
        return False
    if torch.compiler.is_compiling():  # offsets are not traceable; the compiled graph's buffers start aligned
        return True
    return all(t.storage_offset() * t.element_size() % SDPA_ALIGN_BYTES == 0 for t in (q, k, v))


def _sdpa(q, k, v, scale, out_layout):
    """torch's SDPA (its memory-efficient kernel for these inputs), returned in ``out_layout``."""
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (B, H, Sq, D)
    # the memory-efficient kernel writes (B, Sq, H, D) in memory (the math backend (B, H, Sq, D)): copy if need be
    in_layout = out.is_contiguous() if out_layout == "bhsd" else out.transpose(1, 2).is_contiguous()
    return out if in_layout else _empty_out(q, out_layout).copy_(out)


@torch.library.custom_op("fusediff::attention", mutates_args=(), device_types=("cpu", "cuda"))
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 bshd_out: bool = False) -> torch.Tensor:
    """The Triton flash-attention forward as a custom op; inputs validated, any strides, D <= 256.
    The output is contiguous (B, H, Sq, D), or (B, Sq, H, D) in memory with ``bshd_out``."""
    if q.dtype not in _FUSED_DTYPES:
        raise ValueError(f"fusediff::attention: q must be float32, float16 or bfloat16; got {q.dtype}")
    if q.shape[3] > MAX_FUSED_HEAD_DIM:
        raise ValueError(f"fusediff::attention: head size D must be at most {MAX_FUSED_HEAD_DIM}; got {q.shape[3]}")
    out = _empty_out(q, "bshd" if bshd_out else "bhsd")
    if q.numel() == 0 or k.numel() == 0:  # nothing to compute, or no keys: zeros, as the reference
        return out.zero_()
    return _kernels().launch(q, k, v, scale, out=out)


@attention_op.register_fake
def _(q, k, v, scale, bshd_out=False):
    return _empty_out(q, "bshd" if bshd_out else "bhsd")  # (B, H, Sq, D) with the real op's strides


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *,
                  out_layout: str = "bhsd") -> torch.Tensor:
    """The definition of :func:`attention` in PyTorch: fp32 products and softmax, one final rounding."""
    return _ref(q, k, v, _validate(q, k, v, scale, out_layout), out_layout)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *,
              out_layout: str = "bhsd") -> torch.Tensor:
    """Attention softmax(q k^T * scale) v, with the softmax in float32, output in q's dtype.

    Args:
        q: queries of shape (B, H, Sq, D): batch, heads, query positions, head size;
            float32, float16, bfloat16 or float64; any strides.
        k: keys of shape (B, H, Sk, D); q's dtype and device.
        v: values of shape (B, H, Sk, D); q's dtype and device, k's Sk.
        scale: multiplies the logits q k^T; None for 1/sqrt(D). A finite float.
        out_layout: memory order of the output: "bhsd" (contiguous) or "bshd" ((B, Sq, H, D) in
            memory, so that ``out.transpose(1, 2).reshape(B, Sq, H * D)`` is a view).

    Returns:
        out of shape (B, H, Sq, D) in q's dtype, in the memory order ``out_layout`` names.
    """
    scale = _validate(q, k, v, scale, out_layout)
    if _fused_shape(q, k) and _use_fused(q, (q, k, v)):
        return _fused(q, k, v, scale, out_layout)
    if q.shape[3] > MAX_FUSED_HEAD_DIM and _use_sdpa(q, k, v, scale):
        return _sdpa(q, k, v, scale, out_layout)
    return _ref(q, k, v, scale, out_layout)
