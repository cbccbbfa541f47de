"""layer_norm (and its residual form) against torch: the reference is torch's add and layer_norm exactly; the
Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1) writes every element, gives the sum bit for bit
and the norm within the house tolerance of float64, on labelled odd shapes; bad input raises."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from support.tolerance import assert_within_ref_error

from fusediff import kernels as K

LN = sys.modules["fusediff.kernels.layer_norm"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [
    (2, 64, 320),  # SD transformer block, first level (tokens of a 8x8 map)
    (1, 77, 768),  # a text encoder's width
    (3, 5, 1279),  # odd width: masked columns
    (1, 1, 8192),  # the widest row the kernel takes
    (33, 7),  # many short rows: several rows per program, a partial last block
]
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or K._backend._interpreting()) or not K._backend._have_triton(),
    reason="the Triton kernel runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1")


def make(shape, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(dtype)
    b = (0.2 * torch.randn(shape[-1], generator=g)).to(dtype)
    return (t.to(device) for t in (x, r, w, b))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_is_torchs_add_and_layer_norm(dtype):
    x, r, w, b = make((2, 9, 24), dtype, 0)
    y, s = K.layer_norm_ref(x, w, b, 1e-6, residual=r)
    assert torch.equal(s, x + r)
    assert torch.equal(y, F.layer_norm(x + r, (24,), w, b, 1e-6))
    assert torch.equal(K.layer_norm_ref(x, None, None), F.layer_norm(x, (24,)))


def test_bad_input_raises():
    x, r, w, b = make((2, 9, 24), torch.float32, 0)
    with pytest.raises(ValueError, match=r"weight must have shape \(24,\)"):
        K.layer_norm(x, w[:5], b)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        K.layer_norm(x, w, b, residual=r[:1])
    with pytest.raises(ValueError, match="residual must have x's shape"):
        K.layer_norm(x, w, b, residual=r.half())
    with pytest.raises(ValueError, match="eps must be"):
        K.layer_norm(x, w, b, eps=float("nan"))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        K.layer_norm([1.0], w, b)


@needs_triton
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_float64(shape, dtype, affine):
    x, r, w, b = make(shape, dtype, sum(shape), TRITON_DEVICE)
    w, b = (w, b) if affine else (None, None)
    y, s = LN._kernels().launch(x, w, b, 1e-5, r)
    summed = x + r
    if dtype == torch.bfloat16 and not x.is_cuda:  # the interpreter truncates float32 -> bfloat16
        summed = ((x.float() + r.float()).view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
    assert torch.equal(s, summed), (s.double() - summed.double()).abs().max()
    n = shape[-1]
    lowp = F.layer_norm(s, (n,), w, b, 1e-5)
    hi = F.layer_norm(s.double(), (n,), None if w is None else w.double(), None if b is None else b.double(), 1e-5)
    assert_within_ref_error(y, lowp, hi, f"Triton layer_norm {shape} {dtype} {'affine' if affine else 'plain'}")
    y_only = LN._kernels().launch(x, w, b, 1e-5)
    hi_x = F.layer_norm(x.double(), (n,), None if w is None else w.double(), None if b is None else b.double(), 1e-5)
    assert_within_ref_error(y_only, F.layer_norm(x, (n,), w, b, 1e-5), hi_x, f"Triton layer_norm {shape} {dtype} no residual")


@needs_triton
def test_dispatch_takes_the_kernel_where_it_can(monkeypatch):
    calls = []
    real = LN._kernels().launch
    monkeypatch.setattr(LN._kernels(), "launch", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, r, w, b = make((2, 9, 24), torch.float32, 0, TRITON_DEVICE)
    with K.use_backend("fused"):
        K.layer_norm(x, w, b, residual=r)
        K.layer_norm(x.transpose(0, 1).contiguous().transpose(0, 1), w, b)  # unit last-dim stride, other rows
        K.layer_norm(x[..., ::2], w[::2], b[::2])  # strided last dim: the reference
        K.layer_norm(x.requires_grad_(), w, b)  # gradients: the reference
    assert len(calls) == 2, calls
