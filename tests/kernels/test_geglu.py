"""geglu: the reference against an independent float64 formula and against PyTorch's eager
``h * F.gelu(gate)`` (equal in float32, one rounding apart in half precision); autograd;
torch.compile; the feed-forward module against diffusers'; and bad input, which must raise the
same clear exception on every backend.

The Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1): labelled shapes with odd
sizes, every element written, strided inputs, special values, against float64 under the house
tolerance rule; which calls reach it; the custom op under opcheck and torch.compile. In the
interpreter Python's math.erf and numpy's exp stand in for libdevice's erf and tanh, and
float32 -> bfloat16 casts truncate (on CUDA they round to nearest), so there bfloat16 results
are allowed one more ulp than the rule gives."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from support.spy import record_calls
from support.tolerance import ATOL, assert_within_ref_error

from fusediff import kernels as K
from fusediff.kernels import _backend
from fusediff.models.feed_forward import FeedForward

GG = sys.modules["fusediff.kernels.geglu"]  # the module; K.geglu is the function

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
APPROXIMATE = ["none", "tanh"]


def make_x(shape, dtype, seed=0, device="cpu"):
    """x = [h, gate] of ``shape``: gate spread over GELU's bend and both tails, h of unit scale."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2.5
    return x.to(dtype).to(device)


def geglu_fp64(x, approximate="none"):
    """h * GELU(gate) in float64 from the formula, not from F.gelu: what results are measured against."""
    h, g = x.double().chunk(2, dim=-1)
    if approximate == "tanh":
        act = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
    else:
        act = 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))
    return h * act


def torch_eager(x, approximate="none"):
    """What diffusers' GEGLU does after its projection: PyTorch's ops in x's dtype."""
    h, gate = x.chunk(2, dim=-1)
    return h * F.gelu(gate, approximate=approximate)


# --- the reference -----------------------------------------------------------------------------

REF_SHAPES = [
    (4, 2 * 64),  # rows of a small feed-forward
    (2, 77, 2 * 40),  # text tokens, 3-D
    (3, 5, 2 * 37),  # non-aligned
    (2,),  # one value and one gate
    (2, 3, 4, 2 * 3),  # 4-D
]


@pytest.mark.parametrize("approximate", APPROXIMATE)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("shape", REF_SHAPES, ids=str)
def test_ref_against_fp64_formula(shape, dtype, approximate):
    x = make_x(shape, dtype, seed=sum(shape))
    ref = K.geglu_ref(x, approximate)
    hi = geglu_fp64(x, approximate)
    assert ref.shape == (*shape[:-1], shape[-1] // 2) and ref.dtype == dtype and ref.is_contiguous()
    h, g = x.double().chunk(2, dim=-1)
    # one rounding to dtype (half an ulp, as eps * |y| / 2) of a float32 value whose error is a few
    # float32 ulps of h * g (erf near -1 cancels in 1 + erf), and half a subnormal spacing
    compute_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    bound = (torch.finfo(dtype).eps / 2 * hi.abs() + 8 * compute_eps * (h * g).abs()
             + torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps)
    excess = (ref.double() - hi).abs() - bound
    worst = int(excess.flatten().argmax())
    assert excess.max() <= 0, (f"{shape} {dtype} {approximate}: at flat index {worst} ref "
                               f"{ref.flatten()[worst].item():.8g}, fp64 {hi.flatten()[worst].item():.8g}, "
                               f"{int((excess > 0).sum())} of {excess.numel()} beyond the rounding bound")


@pytest.mark.parametrize("approximate", APPROXIMATE)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_ref_against_torch_eager(dtype, approximate):
    x = make_x((6, 33, 2 * 50), dtype, seed=1)
    ref, eager = K.geglu_ref(x, approximate), torch_eager(x, approximate)
    if dtype in (torch.float32, torch.float64):  # the same ops in the same dtype
        torch.testing.assert_close(ref, eager, rtol=0, atol=0)
        return
    # eager rounds gelu(gate) to dtype before the product: at most ~1.5 eps |y| apart; plus float32's
    # error where 1 + erf (or 1 + tanh) cancels, a few ulps of h * gate, which eager's half-precision
    # GELU kernel (another CPU code path) need not share
    diff = (ref.double() - eager.double()).abs()
    h, g = x.double().chunk(2, dim=-1)
    bound = (2 * torch.finfo(dtype).eps * ref.double().abs() + 4 * torch.finfo(torch.float32).eps * (h * g).abs()
             + torch.finfo(dtype).smallest_normal)
    beyond = int((diff > bound).sum())
    assert beyond == 0, f"{dtype} {approximate}: {beyond} values beyond the bound, max difference {diff.max():.3e}"
    assert (diff > 0).any(), "expected eager's extra rounding to show somewhere"


def test_order_by_hand():
    # x = [h, gate] = [2, 1]: 2 * gelu(1) = 2 * Phi(1) = 1.6826894...; swapped halves give 1 * gelu(2)
    x = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    expect = torch.tensor([[2.0 * 0.5 * (1 + math.erf(1 / math.sqrt(2)))], [0.5 * 2.0 * (1 + math.erf(math.sqrt(2)))]])
    torch.testing.assert_close(K.geglu(x), expect)
    torch.testing.assert_close(K.geglu_ref(x), expect)


def test_empty():
    for shape in [(0, 8), (3, 0), (2, 0, 6)]:
        x = torch.zeros(shape, dtype=torch.float16)
        with K.use_backend("fused"):
            y = K.geglu(x)
        assert y.shape == (*shape[:-1], shape[-1] // 2) and y.dtype == torch.float16


def test_autograd_through_the_reference(monkeypatch):
    x = make_x((2, 3, 2 * 5), torch.float64, seed=2).requires_grad_()
    for approximate in APPROXIMATE:
        assert torch.autograd.gradcheck(lambda x: K.geglu(x, approximate), (x,))  # noqa: B023
    # float32 needing grad takes the reference even under "fused": the gradient is PyTorch's
    calls = record_calls(monkeypatch, GG, "_fused")
    x32 = make_x((4, 2 * 9), torch.float32, seed=3).requires_grad_()
    x_eager = x32.detach().clone().requires_grad_()
    w = torch.linspace(-1, 1, 36).view(4, 9)
    with K.use_backend("fused"):
        (K.geglu(x32) * w).sum().backward()
    (torch_eager(x_eager) * w).sum().backward()
    assert not calls
    torch.testing.assert_close(x32.grad, x_eager.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    x = make_x((3, 5, 2 * 37), torch.float32, seed=4)
    compiled = torch.compile(K.geglu, backend=backend, fullgraph=True)
    for approximate in APPROXIMATE:
        torch.testing.assert_close(compiled(x, approximate), K.geglu(x, approximate), rtol=0, atol=0)


def test_feed_forward_matches_diffusers():
    from diffusers.models.attention import FeedForward as DiffusersFeedForward

    torch.manual_seed(0)
    ours, theirs = FeedForward(40, mult=4), DiffusersFeedForward(40, mult=4, activation_fn="geglu")
    theirs.load_state_dict(ours.state_dict())  # the same parameter names and shapes
    x = torch.randn(2, 7, 40)
    with torch.no_grad(), K.use_backend("ref"):
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


# --- the Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1) ----------------------

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or _backend._interpreting()) or not _backend._have_triton(),
    reason="the Triton kernel runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1")
KERNEL_SHAPES = [
    (2, 77, 2 * 1280),  # SD's text length through the first feed-forward's width
    (3, 5, 2 * 37),  # non-aligned
    (1, 2),  # F = 1
    (7, 2 * 256),  # exactly one column block (MAX_BLOCK_N)
    (5, 2 * 257),  # one column into a second block
    (2, 3, 4, 2 * 20),  # 4-D
    (2 * 33,),  # 1-D: a single row
    (300, 2 * 8),  # many narrow rows: a tall block
    (2, 64, 2 * 320),  # a short SD-like block, aligned
]


def launch(x, approximate, out=None):
    return GG._kernels().launch(x, approximate, out=out)


def assert_kernel_within_rule(got, x, approximate, what):
    """The house tolerance rule against float64; in the interpreter, bfloat16 widened by one ulp of each value.

    There the float32 -> bfloat16 cast truncates, up to one ulp off where CUDA rounds to nearest (half an
    ulp), which the reference's largest error need not cover where the largest values lie.
    """
    ref, hi = GG._ref(x, approximate), geglu_fp64(x, approximate)
    if got.is_cuda or got.dtype != torch.bfloat16:
        assert_within_ref_error(got, ref, hi, what)
        return
    f, r = got.double(), ref.double()
    assert got.shape == hi.shape and torch.equal(torch.isnan(f), torch.isnan(hi)), f"{what}: shape or NaN differ"
    f, r, hi = (t.nan_to_num(0.0) for t in (f, r, hi))
    err_ref = (r - hi).abs().max().item() if r.numel() else 0.0
    widen = torch.finfo(torch.bfloat16).eps * hi.abs()  # >= one bfloat16 ulp of hi
    excess = (f - hi).abs() - (2 * err_ref + ATOL[torch.bfloat16] + widen)
    if excess.numel() and excess.max().item() > 0:
        idx = tuple(int(i) for i in torch.nonzero(excess == excess.max())[0])
        raise AssertionError(f"{what}: at {idx} kernel {f[idx].item():.6g}, fp64 {hi[idx].item():.6g}, reference "
                             f"{r[idx].item():.6g} (its largest error {err_ref:.3e}), bound exceeded by "
                             f"{excess[idx].item():.3e}; {int((excess > 0).sum())} of {excess.numel()} elements beyond")


def check_kernel(x, approximate, what, out=None):
    got = launch(x, approximate, out=out)
    assert got.shape == (*x.shape[:-1], x.shape[-1] // 2) and got.dtype == x.dtype and got.is_contiguous()
    assert_kernel_within_rule(got, x, approximate, what)
    return got


@needs_triton
@pytest.mark.parametrize("approximate", APPROXIMATE)
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
def test_triton_writes_every_element(shape, approximate):
    for dtype in DTYPES:
        x = make_x(shape, dtype, seed=sum(shape), device=TRITON_DEVICE)
        out = torch.full((*shape[:-1], shape[-1] // 2), float("nan"), dtype=dtype, device=TRITON_DEVICE)
        got = check_kernel(x, approximate, f"{shape} {dtype} {approximate}", out=out)  # a missed element stays NaN
        assert got is out


@needs_triton
@settings(max_examples=20)
@given(
    lead=st.lists(st.integers(1, 9), min_size=0, max_size=3),
    f=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    approximate=st.sampled_from(APPROXIMATE),
    seed=st.integers(0, 2**31 - 1),
)
def test_triton_random_shapes(lead, f, dtype, approximate, seed):
    x = make_x((*lead, 2 * f), dtype, seed=seed, device=TRITON_DEVICE)
    check_kernel(x, approximate, f"{(*lead, 2 * f)} {dtype} {approximate}")


def strided_inputs(f, dtype):
    """name -> (x, whether the kernel takes it): views of a padded (6, 10, 2F + 6) base."""
    base = make_x((6, 10, 2 * f + 6), dtype, seed=f, device=TRITON_DEVICE)
    return {
        "every other row": (base[:, ::2, : 2 * f], True),  # rows collapse to one stride
        "column window of padded rows": (base[..., 3 : 3 + 2 * f], True),  # row stride 2F + 6, offset 3
        "transposed leading dims": (base[..., : 2 * f].transpose(0, 1), True),  # copied once into rows
        "expanded batch": (base[0, :, : 2 * f].expand(3, 10, 2 * f), True),  # stride 0: copied
        "strided last dim": (base[..., : 4 * (f // 2)][..., ::2], False),  # the reference
    }


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("f", [37, 64])
def test_strided_inputs(f, dtype, monkeypatch):
    calls = record_calls(monkeypatch, GG._kernels(), "launch")
    for name, (x, fused) in strided_inputs(f, dtype).items():
        assert not x.is_contiguous(), name
        del calls[:]
        with K.use_backend("fused"):
            got = K.geglu(x)
        assert len(calls) == int(fused), f"{name}: {len(calls)} kernel launches"
        assert got.is_contiguous()
        assert_kernel_within_rule(got, x, "none", f"{name} F={f} {dtype}")
        if fused:  # the same values as from a contiguous copy
            torch.testing.assert_close(got, launch(x.contiguous(), "none"), rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("approximate", APPROXIMATE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_special_values(dtype, approximate):
    # gates at 0, +-0, the tails (GELU(-40) = -0, GELU(40) = 40) and tiny; h of both signs, 0 and NaN
    gates = torch.tensor([0.0, -0.0, 1e-6, -1e-6, 0.5, -0.5, 3.0, -3.0, 5.5, -5.5, 10.0, -10.0, 40.0, -40.0])
    hs = torch.tensor([1.0, -2.0, 0.0, float("nan")])
    pairs = torch.cartesian_prod(hs, gates)  # (56, 2): [h, gate] rows
    x = pairs.to(dtype).to(TRITON_DEVICE)
    check_kernel(x, approximate, f"special values {dtype} {approximate}")


@needs_triton
def test_public_function_runs_the_kernel_and_the_custom_op_checks(monkeypatch):
    calls = record_calls(monkeypatch, GG._kernels(), "launch")
    x = make_x((3, 5, 2 * 37), torch.float32, seed=5, device=TRITON_DEVICE)
    with K.use_backend("fused"):
        K.geglu(x)  # float32: the kernel
        K.geglu(x.half(), approximate="tanh")  # float16: the kernel
        K.geglu(x.double())  # float64: the reference
        K.geglu(x[..., :0])  # empty: the reference
        K.geglu(x.detach().clone().requires_grad_())  # autograd: the reference
    with K.use_backend("ref"):
        K.geglu(x)
    assert [(a[0].dtype, a[1]) for a in calls] == [(torch.float32, "none"), (torch.float16, "tanh")], calls
    torch.library.opcheck(torch.ops.fusediff.geglu, (x, "none"))
    torch.library.opcheck(torch.ops.fusediff.geglu, (x.half()[:, ::2], "tanh"))  # rows copied once
    torch.library.opcheck(torch.ops.fusediff.geglu, (x.bfloat16()[1:], "none"))
    assert torch.ops.fusediff.geglu(x[:0], "none").shape == (0, 5, 37)
    with pytest.raises(ValueError, match="stride 1"):
        torch.ops.fusediff.geglu(x[..., ::2], "none")


@needs_triton
def test_triton_under_compile_fullgraph(monkeypatch):
    x = make_x((2, 9, 2 * 40), torch.float16, seed=6, device=TRITON_DEVICE)
    calls = record_calls(monkeypatch, GG._kernels(), "launch")
    with K.use_backend("fused"):
        for backend in ("eager", "aot_eager"):
            compiled = torch.compile(lambda x: K.geglu(x, "tanh"), backend=backend, fullgraph=True)
            got = compiled(x)
            torch.testing.assert_close(got, K.geglu(x, "tanh"), rtol=0, atol=0)
    assert len(calls) >= 4, "the compiled graph did not reach the kernel"


@needs_triton
def test_feed_forward_runs_the_kernel(monkeypatch):
    from diffusers.models.attention import FeedForward as DiffusersFeedForward

    torch.manual_seed(0)
    ours = FeedForward(40, mult=4).to(TRITON_DEVICE)
    theirs = DiffusersFeedForward(40, mult=4, activation_fn="geglu").to(TRITON_DEVICE, torch.float64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 7, 40, device=TRITON_DEVICE)
    calls = record_calls(monkeypatch, GG._kernels(), "launch")
    with torch.no_grad():
        with K.use_backend("fused"):
            got = ours(x)
        with K.use_backend("ref"):
            ref = ours(x)
        hi = theirs(x.double())
    assert len(calls) == 1
    assert_within_ref_error(got, ref, hi, "feed-forward, fused GEGLU")


# --- bad input -----------------------------------------------------------------------------

def bad_inputs():
    x = torch.randn(2, 6)
    return [
        ("not a tensor", dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        ("int64", dict(x=torch.arange(6).view(3, 2)), TypeError, "torch.int64"),
        ("bool", dict(x=x > 0), TypeError, "torch.bool"),
        ("complex64", dict(x=x.to(torch.complex64)), TypeError, "complex64"),
        ("float8", dict(x=x.to(torch.float8_e4m3fn)), TypeError, "float8_e4m3fn"),
        ("0-D", dict(x=torch.tensor(1.0)), ValueError, "at least 1-D"),
        ("odd last dim", dict(x=torch.randn(2, 5)), ValueError, "last dim must be even"),
        ("last dim 1", dict(x=torch.randn(3, 1)), ValueError, r"got shape \(3, 1\)"),
        ("approximate 'exact'", dict(x=x, approximate="exact"), ValueError, "approximate must be"),
        ("approximate 'Tanh'", dict(x=x, approximate="Tanh"), ValueError, "'Tanh'"),
        ("approximate None", dict(x=x, approximate=None), ValueError, "approximate must be"),
        ("approximate bool", dict(x=x, approximate=True), ValueError, "approximate must be"),
    ]


@pytest.mark.parametrize("fn", [K.geglu, K.geglu_ref], ids=["geglu", "geglu_ref"])
@pytest.mark.parametrize("backend", ["ref", "fused", "auto"])
@pytest.mark.parametrize("case, kwargs, exc, match", bad_inputs(), ids=[b[0] for b in bad_inputs()])
def test_bad_input_raises_on_every_backend(fn, backend, case, kwargs, exc, match):
    with K.use_backend(backend), pytest.raises(exc, match=match):
        fn(**kwargs)
