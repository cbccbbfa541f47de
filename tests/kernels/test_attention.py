"""attention against torch's scaled_dot_product_attention under the house tolerance rule, on
labelled odd shapes and every dtype; large logits; strided layouts; autograd; torch.compile;
the Triton kernel (on CUDA, or on CPU tensors under TRITON_INTERPRET=1): every row written,
padded head sizes, partial key tiles, strides, dispatch and fallbacks, the custom op; and bad
input, which must raise the same clear exception on every backend."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from support.spy import record_calls
from support.tolerance import assert_within_ref_error

from fusediff import kernels as K
from fusediff.kernels import _backend

AT = sys.modules["fusediff.kernels.attention"]  # the module; K.attention is the function

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_reference_in_query_chunks_matches_one_pass(monkeypatch, dtype):
    """With a score budget of 3 rows (so 63 queries run in 21 chunks), the reference still equals
    SDPA, and gradients flow through the chunks."""
    q, k, v = make_qkv(2, 3, 63, 17, 21, dtype, seed=8)
    row_bytes = 2 * 3 * 17 * (8 if dtype == torch.float64 else 4)
    monkeypatch.setattr(AT, "REF_SCORE_BYTES", 3 * row_bytes)
    calls = record_calls(monkeypatch, AT, "_ref_rows")
    qs = q.clone().requires_grad_()
    got = K.attention_ref(qs, k, v)
    assert len(calls) == 21 and all(c[0].shape[2] == 3 for c in calls), [c[0].shape for c in calls]
    expected = F.scaled_dot_product_attention(q, k, v)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    got.sum().backward()
    q2 = q.clone().requires_grad_()
    F.scaled_dot_product_attention(q2, k, v).sum().backward()
    torch.testing.assert_close(qs.grad, q2.grad, rtol=100 * tol, atol=100 * tol)


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


# --- the Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1) -----------------------

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or _backend._interpreting()) or not _backend._have_triton(),
    reason="the Triton kernel runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1")
has_triton = pytest.mark.skipif(not _backend._have_triton(), reason="needs Triton")
KERNEL_SHAPES = [  # (B, H, Sq, Sk, D)
    (1, 2, 7, 77, 40),  # cross-attention to 77 text tokens; D padded 40 -> 64
    (2, 1, 130, 130, 64),  # self-attention: whole key tiles, then 2 keys; D = BLOCK_D
    (1, 1, 1, 1, 1),  # one query, one key; D padded 1 -> 16
    (1, 3, 77, 7, 8),  # more queries than keys; one partial key tile only
    (1, 1, 33, 130, 80),  # D padded 80 -> 128
    (1, 1, 5, 77, 160),  # D padded 160 -> 256
    (1, 1, 3, 20, 256),  # the largest head size
]
CONFIGS = [  # launch(config=...): tiles smaller and larger than the sequences
    dict(BLOCK_M=16, BLOCK_N=16),
    dict(BLOCK_M=64, BLOCK_N=16),
    dict(BLOCK_M=16, BLOCK_N=64),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8),
]


def on_device(*tensors):
    return tuple(t.to(TRITON_DEVICE) for t in tensors)


def triton_attention(q, k, v, scale, config=None, out=None):
    """The kernel alone, into an output poisoned with NaN: a row it misses stays NaN and fails the rule."""
    if out is None:
        out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    got = AT._kernels().launch(q, k, v, scale, out=out, config=config)
    assert got is out
    return got


def check_kernel(got, q, k, v, scale, what):
    """The house rule against our reference: float32 softmax rounded once (low), and float64."""
    assert_within_ref_error(got, AT._ref(q, k, v, scale), AT._ref(q.double(), k.double(), v.double(), scale), what)


@needs_triton
@pytest.mark.parametrize("scale", [None, -0.7], ids=["default_scale", "negative_scale"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
def test_triton_writes_every_row(shape, dtype, scale):
    q, k, v = on_device(*make_qkv(*shape, dtype, seed=sum(shape)))
    scale = shape[-1] ** -0.5 if scale is None else scale
    check_kernel(triton_attention(q, k, v, scale), q, k, v, scale, f"Triton {shape} {dtype} scale={scale}")


@needs_triton
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c['BLOCK_M']}x{c['BLOCK_N']}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_triton_tile_sizes(config, dtype):
    q, k, v = on_device(*make_qkv(2, 2, 45, 77, 24, dtype, seed=11))  # no size a multiple of any tile
    check_kernel(triton_attention(q, k, v, 0.3, config=config), q, k, v, 0.3, f"Triton {config} {dtype}")


@needs_triton
@settings(max_examples=15)
@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 70), st.integers(1, 70),
                       st.integers(1, 96)),
       dtype=st.sampled_from(DTYPES), scale=st.floats(-1.5, 1.5), config=st.sampled_from(CONFIGS + [None]),
       seed=st.integers(0, 2**31 - 1))
def test_triton_random_shapes(shape, dtype, scale, config, seed):
    q, k, v = on_device(*make_qkv(*shape, dtype, seed))
    check_kernel(triton_attention(q, k, v, scale, config=config), q, k, v, scale,
                 f"Triton {shape} {dtype} scale={scale} config={config} seed={seed}")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_large_logits_do_not_overflow(dtype):
    q, k, v = on_device(*make_qkv(1, 2, 40, 77, 64, dtype, seed=12))
    logits = 30.0 * q.float() @ k.float().transpose(-2, -1)
    assert torch.isinf(logits.exp()).any(), "the data must overflow a softmax without its maximum subtracted"
    got = triton_attention(q, k, v, 30.0)
    assert torch.isfinite(got).all()
    check_kernel(got, q, k, v, 30.0, f"Triton scale 30 {dtype}")


def strided_layouts(b, h, sq, sk, d, dtype, seed):
    """(name, q, k, v) views of other strides; the same values as make_qkv's tensors of that seed."""
    q, k, v = make_qkv(b, h, sq, sk, d, dtype, seed)
    bshd = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731  (B, S, H, D) in memory
    qkv = torch.stack([bshd(q), bshd(k), bshd(v)], dim=2)  # fused projection: (B, S, 3, H, D) when Sq == Sk
    fused = qkv.transpose(1, 3)  # (B, H, 3, S, D) view
    d_major = lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)  # noqa: E731  head dim strided
    return [
        ("(B, S, H, D) views", bshd(q), bshd(k), bshd(v)),
        ("slices of a fused qkv", fused[:, :, 0], fused[:, :, 1], fused[:, :, 2]),
        ("D not innermost", d_major(q), d_major(k), d_major(v)),
        ("k and v broadcast over heads", q, k[:, :1].expand_as(k), v[:, :1].expand_as(v)),
    ]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", range(4), ids=["bshd", "fused_qkv", "d_strided", "expanded"])
def test_triton_reads_any_strides(case, dtype):
    name, q, k, v = strided_layouts(2, 3, 37, 37, 40, dtype, seed=13)[case]
    q, k, v = (t.to(TRITON_DEVICE) for t in (q, k, v))
    assert not (q.is_contiguous() and k.is_contiguous())
    got = triton_attention(q, k, v, 0.25)
    dense = triton_attention(q.contiguous(), k.contiguous(), v.contiguous(), 0.25)
    torch.testing.assert_close(got, dense, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")  # same tiles, same sums
    check_kernel(got, q, k, v, 0.25, name)


@needs_triton
def test_public_function_runs_the_kernel_or_falls_back(monkeypatch):
    q, k, v = on_device(*make_qkv(2, 2, 9, 77, 40, torch.float16, seed=14))
    calls = record_calls(monkeypatch, AT._kernels(), "launch")
    bshd = q.transpose(1, 2).contiguous().transpose(1, 2)
    with K.use_backend("fused"):
        assert torch.equal(K.attention(bshd, k, v), K.attention(q, k, v))  # 2 kernel runs
        K.attention(q.float(), k.float(), v.float(), 0.5)  # 3
        needs_grad = K.attention(q.float().requires_grad_(), k.float(), v.float())  # 4: the fused backward follows
        assert len(calls) == 4 and needs_grad.requires_grad
        fallbacks = {
            "float64": lambda: K.attention(q.double(), k.double(), v.double()),
            "no keys": lambda: K.attention(q, k[:, :, :0], v[:, :, :0]),
            "no queries": lambda: K.attention(q[:, :, :0], k, v),
            "D = 257": lambda: K.attention(*(t.new_ones(1, 1, 3, 257) for t in (q, k, v))),
        }
        results = {name: fn() for name, fn in fallbacks.items()}
    with K.use_backend("ref"):
        K.attention(q, k, v)
    assert len(calls) == 4, f"the reference should have run for {list(fallbacks)} and the ref backend"
    assert torch.equal(results["no keys"], torch.zeros_like(q))
    hi = AT._ref(q.double(), k.double(), v.double(), 40 ** -0.5)
    with torch.no_grad(), K.use_backend("fused"):
        assert_within_ref_error(K.attention(q, k, v), AT._ref(q, k, v, 40 ** -0.5), hi, "fused public function")


@needs_triton
def test_custom_op_checks_and_compiles(monkeypatch):
    q, k, v = on_device(*make_qkv(1, 2, 9, 20, 24, torch.float32, seed=15))
    bshd = q.transpose(1, 2).contiguous().transpose(1, 2)
    for args in ((q, k, v, 0.5), (bshd, k, v, -0.3)):
        torch.library.opcheck(torch.ops.fusediff.attention, args)
    assert torch.equal(torch.ops.fusediff.attention(q, k[:, :, :0], v[:, :, :0], 0.5), torch.zeros_like(q))
    assert torch.ops.fusediff.attention(q[:0], k[:0], v[:0], 0.5).shape == (0, 2, 9, 24)
    with pytest.raises(ValueError, match="at most 256"):
        torch.ops.fusediff.attention(*(t.new_ones(1, 1, 2, 257) for t in (q, k, v)), 0.5)
    with pytest.raises(ValueError, match="float64"):  # the kernel has no float64 path
        torch.ops.fusediff.attention(q.double(), k.double(), v.double(), 0.5)
    calls = record_calls(monkeypatch, AT._kernels(), "launch")
    with K.use_backend("fused"):
        compiled = torch.compile(lambda q, k, v: K.attention(q, k, v, 0.5), backend="aot_eager", fullgraph=True)
        got = compiled(bshd, k, v)
    assert calls, "the compiled graph must call the kernel through torch.ops.fusediff.attention"
    check_kernel(got, bshd, k, v, 0.5, "torch.compile")


@has_triton
@pytest.mark.parametrize("head_dim", [1, 8, 16, 40, 64, 80, 128, 160, 256])
@pytest.mark.parametrize("sq, sk", [(1, 1), (7, 77), (4096, 77), (4096, 4096), (100000, 100000)])
def test_tuning_space_fits_every_problem(head_dim, sq, sk):
    at = AT._kernels()
    bd = at.block_d(head_dim)
    assert bd >= max(16, head_dim) and bd in at.TUNING
    for element_size in (2, 4):
        configs = at.configs_for(bd, at.seq_bucket(sq), at.seq_bucket(sk), element_size)
        assert configs, "the filter must leave a config"
        shapes = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs]
        assert len(set(shapes)) == len(shapes), "no duplicates"
        for bm, bn, warps, _ in shapes:
            assert 16 <= bm <= max(16, triton_next_pow2(sq)) and 16 <= bn <= max(16, triton_next_pow2(sk))
            assert bm * bd // (32 * warps) <= at.ACC_REGS_PER_THREAD or (bm, bn, warps) == shapes[0][:3]


def triton_next_pow2(n):
    return 1 << (n - 1).bit_length()


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
