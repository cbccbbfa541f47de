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
mask, dropout, causal flag or grouped-query heads.

Gradients: where q, k or v requires a gradient, the Triton path runs as well, forward and backward
(:class:`_FlashAttention`): the forward also stores each row's log-sum-exp (float32 (B, H, Sq), in
base 2: log2 sum_j exp(scale * q_i . k_j)), and ``attention_backward_triton.py`` computes dq, dk and
dv from q, k, v, out, that log-sum-exp and dout as FlashAttention-2's backward does (Dao 2023,
arXiv:2307.08691, Algorithm 2; deterministic, no atomics). Each gradient has its input's shape and,
where the input is dense, its strides (torch.empty_like: a (B, S, H, D) projection viewed with
.transpose(1, 2) gets its gradient in that layout), else is contiguous. The fused backward is not
twice differentiable (DOUBLE_BACKWARD_ERROR on a second derivative). Every other call (the reference,
and SDPA's path, which then is not taken with gradients) differentiates through plain torch ops.

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
SDPA runs its math backend for those calls.) float64, the other D > 256 cases (and every
D > 256 call that needs gradients), no keys (Sk = 0) and empty tensors run the reference;
``FUSEDIFF_KERNELS=ref`` runs it always. Under ``torch.compile`` the Triton kernel is reached
through the custom op ``torch.ops.fusediff.attention``, or, where gradients are needed, through
``torch.ops.fusediff.attention_fwd`` (which also returns the log-sum-exp), whose autograd formula
(``torch.library.register_autograd``) is the op ``fusediff.attention_bwd``; SDPA is traced as itself.
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


_FLOAT_SET = frozenset(_FLOAT_DTYPES)
_INF = float("inf")


def _valid(q, k, v, scale, out_layout) -> bool:
    """The common case of :func:`_validate` in a few checks: True only where every check there passes."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
            and (out_layout == "bhsd" or out_layout == "bshd")
            and (scale is None or (type(scale) is float and -_INF < scale < _INF))):
        return False
    if not (q.dim() == 4 and k.dim() == 4 and v.dim() == 4 and q.dtype in _FLOAT_SET
            and k.dtype == q.dtype and v.dtype == q.dtype):
        return False
    qs, ks, vs = q.shape, k.shape, v.shape
    return (qs[3] > 0 and ks[0] == qs[0] and ks[1] == qs[1] and ks[3] == qs[3] and vs[0] == qs[0]
            and vs[1] == qs[1] and vs[3] == qs[3] and ks[2] == vs[2] and k.device == q.device
            and v.device == q.device)


def _validate(q, k, v, scale, out_layout="bhsd") -> float:
    """Raise TypeError/ValueError naming the argument; return the scale to use."""
    if _valid(q, k, v, scale, out_layout):
        return 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
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


def _backward_kernels() -> ModuleType:
    return _backend.triton_module("attention_backward")


def _use_fused(q: torch.Tensor, tensors) -> bool:
    """Whether this call runs the Triton kernels (shape aside): DESIGN.md decision 2; with autograd too,
    the Triton backward then computing the gradients."""
    return _backend.use_triton(q, _FUSED_DTYPES, tensors, backward=True)


def _fused_shape(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the kernel covers these sizes: some queries and keys, 1 <= D <= 256."""
    return q.numel() > 0 and k.numel() > 0 and q.shape[3] <= MAX_FUSED_HEAD_DIM


def _fused(q, k, v, scale, out_layout):
    """The Triton forward; where q, k or v needs a gradient, through :class:`_FlashAttention` (eager) or
    the differentiable op ``fusediff::attention_fwd`` (torch.compile), whose backward is the Triton one."""
    if _backend.needs_grad((q, k, v)):
        if torch.compiler.is_compiling():
            return torch.ops.fusediff.attention_fwd(q, k, v, scale, out_layout == "bshd")[0]
        return _FlashAttention.apply(q, k, v, scale, out_layout)
    if torch.compiler.is_compiling():
        return torch.ops.fusediff.attention(q, k, v, scale, out_layout == "bshd")
    return _kernels().launch(q, k, v, scale, out=_empty_out(q, out_layout))


def _forward_with_lse(q, k, v, scale, out_layout):
    """(out, lse, out_lo) by the Triton forward: lse float32 (B, H, Sq), each row's log-sum-exp in base 2;
    out_lo out's rounding residual for float16/bfloat16 (None for float32), which the backward reads."""
    out = _empty_out(q, out_layout)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)  # (B, H, Sq)
    out_lo = None if q.dtype == torch.float32 else torch.empty_like(out)
    _kernels().launch(q, k, v, scale, out=out, lse=lse, out_lo=out_lo)
    return out, lse, out_lo


class _FlashAttention(torch.autograd.Function):
    """Eager autograd of the Triton path: the forward saves q, k, v, out, the base-2 log-sum-exp and out's
    rounding residual; the backward runs attention_backward_triton (FlashAttention-2's Algorithm 2).
    Not twice differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, scale, out_layout):
        out, lse, out_lo = _forward_with_lse(q, k, v, scale, out_layout)
        ctx.save_for_backward(q, k, v, out, lse, out_lo)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, out_lo = ctx.saved_tensors
        with torch.no_grad():
            grads = _backward_kernels().launch(dout, q, k, v, out, lse, ctx.scale, out_lo)
        return (*_once_differentiable(grads), None, None)


DOUBLE_BACKWARD_ERROR = ("attention: the fused Triton backward is not twice differentiable; for higher-order "
                         "gradients run the reference (fusediff.kernels.use_backend('ref') or FUSEDIFF_KERNELS=ref)")


def _once_differentiable(grads: tuple) -> tuple:
    """``grads`` as they are, or, under create_graph=True, behind a node that raises DOUBLE_BACKWARD_ERROR
    when differentiated (torch.autograd.function.once_differentiable's device, here also when the output
    gradient does not require grad, since q, k and v do)."""
    if not torch.is_grad_enabled():
        return grads
    err = torch._C._functions.DelayedError(DOUBLE_BACKWARD_ERROR.encode(), len(grads))
    return err(*(g.detach().requires_grad_() for g in grads))


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


def _attention_fake(q, k, v, scale, bshd_out=False):
    return _empty_out(q, "bshd" if bshd_out else "bhsd")  # (B, H, Sq, D) with the real op's strides


@_backend.kernel_op("fusediff::attention", _attention_fake)
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


def _check_op(name: str, q: torch.Tensor) -> None:
    if q.dtype not in _FUSED_DTYPES:
        raise ValueError(f"fusediff::{name}: q must be float32, float16 or bfloat16; got {q.dtype}")
    if q.shape[3] > MAX_FUSED_HEAD_DIM:
        raise ValueError(f"fusediff::{name}: head size D must be at most {MAX_FUSED_HEAD_DIM}; got {q.shape[3]}")


def _attention_fwd_fake(q, k, v, scale, bshd_out=False):
    out = _empty_out(q, "bshd" if bshd_out else "bhsd")
    out_lo = q.new_empty(0) if q.dtype == torch.float32 else torch.empty_like(out)
    return out, q.new_empty(q.shape[:3], dtype=torch.float32), out_lo


@_backend.kernel_op("fusediff::attention_fwd", _attention_fwd_fake)
def attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     bshd_out: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fusediff::attention that also returns lse, float32 (B, H, Sq): each row's log-sum-exp of its logits
    in base 2, log2(sum_j exp(scale * q_i . k_j)) (-inf with no keys), and out_lo: for float16/bfloat16
    out's rounding residual (out's shape and strides), for float32 an empty tensor. Differentiable in q, k,
    v (register_autograd: fusediff::attention_bwd); lse and out_lo are not differentiable."""
    _check_op("attention_fwd", q)
    out, lse, out_lo = _attention_fwd_fake(q, k, v, scale, bshd_out)
    if q.numel() == 0 or k.numel() == 0:
        return out.zero_(), lse.fill_(float("-inf")), out_lo.zero_()
    _kernels().launch(q, k, v, scale, out=out, lse=lse, out_lo=out_lo if out_lo.numel() else None)
    return out, lse, out_lo


def _attention_bwd_fake(dout, q, k, v, out, lse, out_lo, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@_backend.kernel_op("fusediff::attention_bwd", _attention_bwd_fake)
def attention_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, out_lo: torch.Tensor, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of fusediff::attention_fwd by the Triton backward, from its three outputs and the output
    gradient ``dout`` (any strides). Each gradient has its input's shape, and its strides where the input
    is dense (torch.empty_like), else is contiguous."""
    _check_op("attention_bwd", q)
    if q.numel() == 0 or k.numel() == 0:  # no queries or no keys: every gradient is zero
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    return _backward_kernels().launch(dout, q, k, v, out, lse, scale, out_lo if out_lo.numel() else None)


def _setup_attention_fwd(ctx, inputs, output):
    q, k, v, scale, _ = inputs
    out, lse, out_lo = output
    ctx.save_for_backward(q, k, v, out, lse, out_lo)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse, out_lo)


def _attention_fwd_backward(ctx, dout, dlse, dout_lo):
    """Gradients of q, k, v by fusediff::attention_bwd (lse and out_lo are not differentiable)."""
    q, k, v, out, lse, out_lo = ctx.saved_tensors
    dq, dk, dv = torch.ops.fusediff.attention_bwd(dout, q, k, v, out, lse, out_lo, ctx.scale)
    return dq, dk, dv, None, None


torch.library.register_autograd("fusediff::attention_fwd", _attention_fwd_backward, setup_context=_setup_attention_fwd)


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
