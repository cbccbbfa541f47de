"""attention against torch's scaled_dot_product_attention under the house tolerance rule, on
labelled odd shapes and every dtype; large logits; strided layouts; autograd; torch.compile;
and bad input, which must raise the same clear exception on every backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from support.tolerance import assert_within_ref_error

from fusediff import kernels as K

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [  # (B, H, Sq, Sk, D)
    (2, 4, 64, 64, 32),  # self-attention, aligned
    (2, 3, 63, 17, 21),  # non-aligned
    (1, 1, 1, 1, 1),  # one query, one key, head size 1
    (1, 2, 77, 5, 40),  # more queries than keys
    (1, 2, 5, 77, 40),  # cross-attention to 77 text tokens
    (1, 1, 3, 130, 160),  # long key row, head size above 128
    (0, 2, 4, 4, 8),  # empty batch
    (1, 2, 0, 4, 8),  # no queries
    (2, 1, 3, 0, 8),  # no keys: zeros, as torch
]


def make_qkv(b, h, sq, sk, d, dtype, seed, logit_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=g) * logit_scale
    k = torch.randn(b, h, sk, d, generator=g)
    v = torch.randn(b, h, sk, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def check_against_sdpa(q, k, v, scale, what):
    with K.use_backend("fused"):
        got = K.attention(q, k, v, scale)
    lowp = F.scaled_dot_product_attention(q, k, v, scale=scale)
    hi = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
    assert got.dtype == q.dtype and got.shape == q.shape
    assert_within_ref_error(got, lowp, hi, what)


@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_sdpa_labelled_shapes(shape, dtype, scale):
    q, k, v = make_qkv(*shape, dtype, seed=sum(shape))
    check_against_sdpa(q, k, v, scale, f"(B, H, Sq, Sk, D)={shape} {dtype} scale={scale}")


@settings(max_examples=25)
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 40), st.integers(1, 40),
                    st.integers(1, 48)),
    dtype=st.sampled_from(DTYPES),
    scale=st.one_of(st.none(), st.floats(-2.0, 2.0)),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_sdpa_random(shape, dtype, scale, seed):
    q, k, v = make_qkv(*shape, dtype, seed)
    check_against_sdpa(q, k, v, scale, f"(B, H, Sq, Sk, D)={shape} {dtype} scale={scale} seed={seed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_logits_stay_finite(dtype):
    q, k, v = make_qkv(1, 2, 33, 47, 64, dtype, seed=3, logit_scale=60.0)  # logits in the hundreds
    got = K.attention(q, k, v)
    assert torch.isfinite(got).all()
    check_against_sdpa(q, k, v, None, f"large logits {dtype}")


def test_float64_ref_matches_sdpa_closely():
    q, k, v = make_qkv(2, 3, 63, 17, 21, torch.float64, seed=4)
    torch.testing.assert_close(K.attention_ref(q, k, v), F.scaled_dot_product_attention(q, k, v),
                               rtol=1e-12, atol=1e-12)


def test_strided_inputs_match_contiguous():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 9, 3, 16, generator=g).transpose(1, 2) for _ in range(3))  # (B, S, H, D) views
    assert not q.is_contiguous()
    got = K.attention(q, k, v)
    assert got.is_contiguous()
    # a strided matmul may sum in another order than a contiguous one, so compare by the rule
    dense = K.attention(q.contiguous(), k.contiguous(), v.contiguous())
    assert_within_ref_error(got, dense, K.attention(q.double(), k.double(), v.double()), "(B, S, H, D) views")


def test_gradcheck_float64():
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 3, 4, 5, torch.float64, seed=6))
    assert torch.autograd.gradcheck(lambda q, k, v: K.attention(q, k, v, 0.7), (q, k, v))


def test_gradients_match_sdpa_float32():
    q, k, v = make_qkv(2, 2, 7, 9, 8, torch.float32, seed=7)
    grads = []
    for fn in (K.attention, F.scaled_dot_product_attention):
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        (fn(qs, ks, vs) * torch.linspace(-1, 1, q.numel()).view(q.shape)).sum().backward()
        grads.append((qs.grad, ks.grad, vs.grad))
    for name, ours, theirs in zip("qkv", *grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")


def test_compile_fullgraph():
    q, k, v = make_qkv(1, 2, 9, 7, 8, torch.float32, seed=8)
    compiled = torch.compile(K.attention, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, 0.5), K.attention(q, k, v, 0.5))
    torch.testing.assert_close(compiled(q, k, v), K.attention(q, k, v))


# --- bad input -----------------------------------------------------------------------------

def bad_inputs():
    q = torch.randn(2, 3, 5, 8)
    k = torch.randn(2, 3, 7, 8)
    v = torch.randn(2, 3, 7, 8)
    return [
        ("q not a tensor", dict(q=q.tolist(), k=k, v=v), TypeError, "q must be a torch.Tensor"),
        ("v not a tensor", dict(q=q, k=k, v=None), TypeError, "v must be a torch.Tensor"),
        ("q 3-D", dict(q=q[0], k=k, v=v), ValueError, "q must have shape"),
        ("k 5-D", dict(q=q, k=k[None], v=v), ValueError, "k must have shape"),
        ("integer dtype", dict(q=q.long(), k=k.long(), v=v.long()), TypeError, "int64"),
        ("k dtype", dict(q=q, k=k.half(), v=v), ValueError, "k is torch.float16"),
        ("v dtype", dict(q=q, k=k, v=v.double()), ValueError, "v is torch.float64"),
        ("v device", dict(q=q, k=k, v=v.to("meta")), ValueError, "v is on meta"),
        ("batch mismatch", dict(q=q, k=k[:1], v=v[:1]), ValueError, "k has shape"),
        ("heads mismatch", dict(q=q, k=k, v=v[:, :2]), ValueError, "v has shape"),
        ("head size mismatch", dict(q=q, k=k[..., :4], v=v), ValueError, "k has shape"),
        ("value head size", dict(q=q, k=k, v=torch.randn(2, 3, 7, 16)), ValueError, "v has shape"),
        ("k and v lengths", dict(q=q, k=k, v=v[:, :, :6]), ValueError, "k has Sk=7.*v has 6"),
        ("head size 0", dict(q=q[..., :0], k=k[..., :0], v=v[..., :0]), ValueError, "head size D"),
        ("scale string", dict(q=q, k=k, v=v, scale="0.1"), TypeError, "scale"),
        ("scale tensor", dict(q=q, k=k, v=v, scale=torch.tensor(0.1)), TypeError, "scale"),
        ("scale nan", dict(q=q, k=k, v=v, scale=float("nan")), ValueError, "scale"),
        ("scale inf", dict(q=q, k=k, v=v, scale=float("inf")), ValueError, "scale"),
    ]


@pytest.mark.parametrize("fn", [K.attention, K.attention_ref], ids=["attention", "attention_ref"])
@pytest.mark.parametrize("backend", ["ref", "fused", "auto"])
@pytest.mark.parametrize("case, kwargs, exc, match", bad_inputs(), ids=[b[0] for b in bad_inputs()])
def test_bad_input_raises_on_every_backend(fn, backend, case, kwargs, exc, match):
    with K.use_backend(backend), pytest.raises(exc, match=match):
        fn(**kwargs)
