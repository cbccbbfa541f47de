"""attention's Triton backward on a CUDA device at Stable Diffusion's sizes: dq, dk, dv of the fused
path against autograd through attention_ref in float64, under the house tolerance rule (the low-precision
reference being autograd through attention_ref in the input dtype); SDPA's own backward error on the same
inputs is printed beside ours for comparison (run with -s). Every test here is marked gpu and skips
without CUDA. The float64 reference materialises the (B, H, Sq, Sk) scores and their gradients, so the
largest case needs ~10 GB of device memory."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from support.spy import record_calls
from support.tolerance import assert_within_ref_error

from fusediff import kernels as K

AT = sys.modules["fusediff.kernels.attention"]
pytestmark = pytest.mark.gpu
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SHAPES = [  # (B, H, Sq, Sk, D)
    (2, 8, 4096, 4096, 40),  # SD 1.5 at 64x64 latents, self-attention
    (2, 8, 4096, 77, 40),  # the same, cross-attention to 77 text tokens
    (8, 8, 1024, 1024, 80),  # SD 1.5 at 32x32
    (8, 8, 1024, 77, 80),  # cross-attention at 32x32
    (4, 8, 1024, 1024, 64),  # heads of 64
    (2, 8, 1024, 1024, 160),  # SD 1.5 at 16x16: heads of 160, padded to 256
    (3, 8, 1000, 77, 160),  # no length a tile multiple
]


def qkv_dout(b, h, sq, sk, d, dtype, seed):
    """q, k, v as (B, H, S, D) views of (B, S, H, D) projections, and a contiguous dout."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda s: torch.randn(b, s, h, d, generator=g, device="cuda").to(dtype).transpose(1, 2)  # noqa: E731
    return make(sq), make(sk), make(sk), torch.randn(b, h, sq, d, generator=g, device="cuda").to(dtype)


def grads(fn, q, k, v, dout):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    return torch.autograd.grad(fn(*leaves), leaves, dout)


# every shape in fp16 and bf16; fp32 on the smaller ones (the fp64 reference of the 4096-long
# self-attention takes most of this file's time)
CASES = [(s, d) for s in SHAPES for d in DTYPES if d != torch.float32 or s[2] * s[3] <= 1024 * 1024 and s[0] <= 4]


@pytest.mark.parametrize("shape, dtype", CASES, ids=str)
def test_gradients_sd_shapes(shape, dtype, monkeypatch):
    q, k, v, dout = qkv_dout(*shape, dtype, seed=sum(shape))
    calls = record_calls(monkeypatch, AT._backward_kernels(), "launch")
    with K.use_backend("fused"):
        fused = grads(K.attention, q, k, v, dout)
    assert len(calls) == 1, "the Triton backward must run"
    low = grads(K.attention_ref, q, k, v, dout)
    hi = grads(K.attention_ref, *(t.double() for t in (q, k, v, dout)))
    sdpa = grads(F.scaled_dot_product_attention, q, k, v, dout)
    for name, f, r, h, s in zip(("dq", "dk", "dv"), fused, low, hi, sdpa):
        errs = {what: (t.double() - h).abs().max().item() for what, t in (("fused", f), ("ref", r), ("sdpa", s))}
        print(f"{shape} {dtype} {name}: max |error| " + ", ".join(f"{w} {e:.2e}" for w, e in errs.items()))
        assert_within_ref_error(f, r, h, f"{shape} {dtype} {name}")
    del low, hi, sdpa
    torch.cuda.empty_cache()


def test_gradients_in_the_input_layout():
    """(B, S, H, D) views in, gradients laid out the same way (no copy for the projections' backward)."""
    q, k, v, dout = qkv_dout(2, 8, 300, 77, 40, torch.float16, seed=1)
    with K.use_backend("fused"):
        dq, dk, dv = grads(K.attention, q, k, v, dout)
    assert dq.stride() == q.stride() and dk.stride() == k.stride() and dv.stride() == v.stride()


def test_compiled_training_step():
    q, k, v, dout = qkv_dout(2, 8, 1024, 77, 40, torch.float16, seed=2)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    loss = torch.compile(lambda q, k, v: (K.attention(q, k, v).float() * dout.float()).sum(), fullgraph=True)
    loss(*leaves).backward()
    low = grads(K.attention_ref, q, k, v, dout)
    hi = grads(K.attention_ref, *(t.double() for t in (q, k, v, dout)))
    for name, leaf, r, h in zip(("dq", "dk", "dv"), leaves, low, hi):
        assert_within_ref_error(leaf.grad, r, h, f"torch.compile {name}")
