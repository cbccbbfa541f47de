"""group_norm against torch's group_norm (+ silu) under the house tolerance rule, on labelled
odd shapes and every dtype; two-pass statistics on data with a large mean; layouts; autograd;
torch.compile; and bad input, which must raise the same clear exception on every backend."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from support.spy import record_calls
from support.tolerance import assert_within_ref_error

from fusediff import kernels as K

GN = sys.modules["fusediff.kernels.group_norm"]  # the module; K.group_norm is the function

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = [  # (shape, num_groups)
    ((2, 32, 8, 8), 8),  # a UNet feature map, aligned
    ((2, 63, 21, 17), 7),  # non-aligned
    ((1, 6, 5, 3, 2), 3),  # three spatial dims (video, volume)
    ((3, 10), 5),  # no spatial dims
    ((2, 4, 1), 4),  # one element per group: variance 0, only eps
    ((1, 12, 33), 1),  # a single group (LayerNorm over C and S)
    ((2, 12, 7), 12),  # a group per channel (InstanceNorm)
    ((0, 8, 4, 4), 2),  # empty batch
    ((2, 8, 0), 4),  # empty spatial dim
    ((1, 4, 64, 65), 2),  # long groups, odd length
]


def make_inputs(shape, dtype, seed, param_dtype=None, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.0 + offset
    c = shape[1]
    w = 1.0 + 0.5 * torch.randn(c, generator=g)
    b = 0.5 * torch.randn(c, generator=g)
    pd = param_dtype or dtype
    return x.to(dtype), w.to(pd), b.to(pd)


def torch_group_norm(x, num_groups, w, b, eps, activation):
    y = F.group_norm(x, num_groups, w, b, eps)
    return F.silu(y) if activation == "silu" else y


def check_against_torch(x, num_groups, w, b, eps, activation, what):
    with K.use_backend("fused"):
        got = K.group_norm(x, num_groups, w, b, eps, activation)
    lowp = torch_group_norm(x, num_groups, w, b, eps, activation)
    up = lambda t: None if t is None else t.double()  # noqa: E731
    hi = torch_group_norm(x.double(), num_groups, up(w), up(b), eps, activation)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert_within_ref_error(got, lowp, hi, what)


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, num_groups", CASES, ids=[str(c) for c in CASES])
def test_matches_torch_labelled_shapes(shape, num_groups, dtype, activation):
    x, w, b = make_inputs(shape, dtype, seed=sum(shape))
    check_against_torch(x, num_groups, w, b, 1e-5, activation, f"shape={shape} G={num_groups} {dtype} {activation}")


@settings(max_examples=25)
@given(
    batch=st.integers(1, 3),
    groups=st.integers(1, 6),
    per_group=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 9), min_size=0, max_size=3),
    dtype=st.sampled_from(DTYPES),
    affine=st.booleans(),
    activation=st.sampled_from([None, "silu"]),
    eps=st.sampled_from([0.0, 1e-6, 1e-5, 0.1]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_torch_random(batch, groups, per_group, spatial, dtype, affine, activation, eps, seed):
    group_numel = per_group * torch.Size(spatial).numel()
    assume(batch * group_numel > 1)  # torch refuses a single value per group in all; see below
    if group_numel == 1 and eps == 0.0:
        eps = 1e-5  # one value per group with eps=0 is 0 * inf = NaN
    shape = (batch, groups * per_group, *spatial)
    x, w, b = make_inputs(shape, dtype, seed)
    check_against_torch(x, groups, w if affine else None, b if affine else None, eps, activation,
                        f"shape={shape} G={groups} {dtype} affine={affine} {activation} eps={eps}")


def test_one_value_per_group_gives_the_bias():
    # torch's group_norm refuses (1, C) with C groups ("more than 1 value per channel");
    # the definition is still clear: x - mean = 0, so y = bias (then silu)
    x, w, b = make_inputs((1, 5), torch.float32, seed=3)
    torch.testing.assert_close(K.group_norm(x, 5, w, b), b.view(1, 5), rtol=0, atol=0)
    torch.testing.assert_close(K.group_norm(x, 5, w, b, activation="silu"), F.silu(b).view(1, 5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_weights_with_low_precision_x(dtype):
    x, w, b = make_inputs((2, 12, 9, 7), dtype, seed=4, param_dtype=torch.float32)
    check_against_torch(x, 4, w, b, 1e-5, "silu", f"{dtype} x, float32 weight and bias")


def test_two_pass_variance_survives_a_large_mean():
    x, w, b = make_inputs((2, 8, 16, 16), torch.float32, seed=5, offset=1e4)  # std 2, mean 1e4
    got = K.group_norm(x, 4, w, b)
    hi = F.group_norm(x.double(), 4, w.double(), b.double())
    err = (got.double() - hi).abs().max().item()
    assert err < 1e-2, f"two-pass group_norm error {err:.3e} against float64 at mean 1e4"
    # the same data through E[x^2] - E[x]^2 in float32 is far off: the test can tell them apart
    xg = x.reshape(2, 4, -1)
    naive_var = (xg.square().mean(-1) - xg.mean(-1).square())
    true_var = x.double().reshape(2, 4, -1).var(-1, unbiased=False)
    assert (naive_var.double() - true_var).abs().max().item() > 0.1


def test_float64_ref_matches_torch_closely():
    x, w, b = make_inputs((2, 63, 21, 17), torch.float64, seed=6)
    torch.testing.assert_close(K.group_norm_ref(x, 7, w, b, 1e-5, "silu"),
                               F.silu(F.group_norm(x, 7, w, b, 1e-5)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape, memory_format", [
    ((2, 12, 5, 7), torch.channels_last),  # NHWC
    ((2, 12, 3, 5, 4), torch.channels_last_3d),  # NDHWC
])
def test_channels_last_keeps_its_layout(shape, memory_format):
    x, w, b = make_inputs(shape, torch.float32, seed=7)
    xl = x.contiguous(memory_format=memory_format)
    with K.use_backend("fused"):
        got = K.group_norm(xl, 3, w, b, activation="silu")
    assert got.is_contiguous(memory_format=memory_format)
    check_against_torch(xl, 3, w, b, 1e-5, "silu", f"{memory_format} {shape}")  # both layouts, by the rule
    check_against_torch(x, 3, w, b, 1e-5, "silu", f"contiguous {shape}")


def test_other_strides_give_contiguous_output():
    x, w, b = make_inputs((2, 6, 9, 5), torch.float32, seed=8)
    xt = x.transpose(2, 3)  # (2, 6, 5, 9), neither contiguous nor channels-last
    got = K.group_norm(xt, 2, w, b)
    assert got.is_contiguous()
    check_against_torch(xt, 2, w, b, 1e-5, None, "(2, 6, 5, 9) transposed view")


@pytest.mark.parametrize("activation", [None, "silu"])
def test_gradcheck_float64(activation):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: K.group_norm(x, 2, w, b, 1e-5, activation), (x, w, b))


def test_gradients_match_torch_float32():
    x, w, b = make_inputs((2, 12, 5, 3), torch.float32, seed=10)
    grads = []
    for fn in (lambda x, w, b: K.group_norm(x, 4, w, b, activation="silu"),
               lambda x, w, b: F.silu(F.group_norm(x, 4, w, b))):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        (fn(xs, ws, bs) * torch.linspace(-1, 1, x.numel()).view(x.shape)).sum().backward()
        grads.append((xs.grad, ws.grad, bs.grad))
    for name, ours, theirs in zip("xwb", *grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")


def test_compile_fullgraph():
    x, w, b = make_inputs((2, 6, 5, 7), torch.float32, seed=11)
    x = x.contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(K.group_norm, backend="aot_eager", fullgraph=True)
    got = compiled(x, 3, w, b, 1e-5, "silu")
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, K.group_norm(x, 3, w, b, 1e-5, "silu"))


# --- the Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1) ---------------------

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or GN._interpreting()) or not GN._have_triton(),
    reason="the Triton kernels run on CUDA, or on CPU tensors under TRITON_INTERPRET=1")
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
PLANS = [  # (shape, num_groups, plan): run launch() with each plan the group fits
    ((2, 32, 8, 8), 8, "one_pass"),  # a group of 4 x 64 in registers
    ((2, 32, 8, 8), 8, "split"),  # the same, split
    ((2, 63, 21, 17), 7, "one_pass"),  # non-aligned
    ((2, 63, 21, 17), 7, "split"),  # non-aligned, split
    ((2, 40, 50, 60), 4, "split"),  # groups of 10 x 3000, several ranges per channel
    ((1, 1280, 4, 4), 1, "split"),  # one group of all channels (several tiles along C in NHWC)
    ((3, 6, 129, 7), 2, "split"),  # non-aligned positions
]


def triton_group_norm(x, num_groups, w, b, eps, activation, out=None, plan=None):
    cl = GN._channels_last(x)
    assert cl is not None
    return GN._kernels().launch(x, num_groups, w, b, eps, activation == "silu", cl, out=out, force_plan=plan)


def poisoned_like(x):
    return torch.full_like(x, float("nan"))  # an element the kernel misses stays NaN and fails the rule


@needs_triton
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, num_groups, plan", PLANS, ids=[str(p) for p in PLANS])
def test_triton_plans_write_every_element(shape, num_groups, plan, dtype, layout):
    x, w, b = (t.to(TRITON_DEVICE) for t in make_inputs(shape, dtype, seed=sum(shape)))
    x = x.contiguous(memory_format=LAYOUTS[layout])
    out = poisoned_like(x)
    got = triton_group_norm(x, num_groups, w, b, 1e-5, "silu", out=out, plan=plan)
    assert got is out and got.stride() == x.stride()
    lowp = torch_group_norm(x, num_groups, w, b, 1e-5, "silu")
    hi = torch_group_norm(x.double(), num_groups, w.double(), b.double(), 1e-5, "silu")
    assert_within_ref_error(got, lowp, hi, f"Triton {plan} {shape} G={num_groups} {dtype} {layout}")


@needs_triton
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape, num_groups, plan", [p for p in PLANS if p[0] == (2, 40, 50, 60)] + PLANS[:2],
                         ids=lambda p: str(p))
def test_triton_statistics_survive_a_large_mean(shape, num_groups, plan, layout):
    x, w, b = (t.to(TRITON_DEVICE) for t in make_inputs(shape, torch.float32, seed=5, offset=1e4))
    x = x.contiguous(memory_format=LAYOUTS[layout])
    got = triton_group_norm(x, num_groups, w, b, 1e-5, None, plan=plan)
    err = (got.double() - F.group_norm(x.double(), num_groups, w.double(), b.double())).abs().max().item()
    assert err < 1e-2, f"Triton group_norm error {err:.3e} against float64 at mean 1e4 ({shape}, {layout})"


@needs_triton
@pytest.mark.parametrize("programs_per_sm", [64, 1], ids=["many short ranges", "one long range"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_triton_split_with_small_tiles_merges_many_ranges(monkeypatch, layout, programs_per_sm):
    # tiles of 64 elements and merge tiles of 4 partials: with many programs, many ranges per
    # channel and several merge iterations per group; with one, several whole tiles per range
    # (Welford's loop) before a partial last one
    triton_module = GN._kernels()
    for name, value in (("TILE", 64), ("FINALIZE_TILE", 4), ("PROGRAMS_PER_SM", programs_per_sm),
                        ("MAX_TILE_C", 4)):
        monkeypatch.setattr(triton_module, name, value)
    x, w, b = (t.to(TRITON_DEVICE) for t in make_inputs((2, 12, 13, 11), torch.float32, seed=21, offset=50.0))
    x = x.contiguous(memory_format=LAYOUTS[layout])
    got = triton_group_norm(x, 3, w, b, 1e-5, "silu", out=poisoned_like(x), plan="split")
    lowp = torch_group_norm(x, 3, w, b, 1e-5, "silu")
    hi = torch_group_norm(x.double(), 3, w.double(), b.double(), 1e-5, "silu")
    assert_within_ref_error(got, lowp, hi, f"small tiles, {layout}")


@needs_triton
def test_triton_without_affine_and_strided_parameters():
    x, w, b = (t.to(TRITON_DEVICE) for t in make_inputs((2, 12, 9, 11), torch.float16, seed=12))
    wide = torch.stack([w, w], dim=1)  # (C, 2): w as a view with stride 2
    cases = [(weight, bias, plan) for weight, bias in ((None, None), (wide[:, 0], None), (None, b), (wide[:, 1], b))
             for plan in ("one_pass", "split")]
    for weight, bias, plan in cases:
        got = triton_group_norm(x, 3, weight, bias, 1e-5, "silu", plan=plan)
        check = torch_group_norm(x, 3, weight, bias, 1e-5, "silu")
        hi = torch_group_norm(x.double(), 3, None if weight is None else weight.double(),
                              None if bias is None else bias.double(), 1e-5, "silu")
        assert_within_ref_error(got, check, hi, f"{plan} weight={weight is not None} bias={bias is not None}")


@needs_triton
def test_public_function_runs_the_kernel_and_the_custom_op_checks(monkeypatch):
    x, w, b = (t.to(TRITON_DEVICE) for t in make_inputs((2, 8, 6, 5), torch.float32, seed=13))
    calls = record_calls(monkeypatch, GN._kernels(), "launch")
    with K.use_backend("fused"):
        K.group_norm(x, 4, w, b, activation="silu")
        K.group_norm(x.contiguous(memory_format=torch.channels_last), 4, w, b)
        K.group_norm(x.transpose(2, 3), 4, w, b)  # other strides: the reference
        K.group_norm(x.double(), 4, w, b)  # float64: the reference
        K.group_norm(x.requires_grad_(), 4, w, b)  # autograd: the fused forward too (test_group_norm_backward.py)
    assert len(calls) == 3
    torch.library.opcheck(torch.ops.fusediff.group_norm, (x.detach(), 4, w, b, 1e-5, True))
    with pytest.raises(ValueError, match="contiguous or channels-last"):  # never read with the wrong strides
        torch.ops.fusediff.group_norm(x.detach().transpose(2, 3), 4, w, b, 1e-5, True)
    assert torch.ops.fusediff.group_norm(x.detach()[:0], 4, w, b, 1e-5, True).shape == (0, 8, 6, 5)


# --- bad input -----------------------------------------------------------------------------

def bad_inputs():
    x = torch.randn(2, 6, 4)
    w = torch.ones(6)
    return [
        ("x not a tensor", dict(x=x.tolist(), num_groups=2), TypeError, "x must be a torch.Tensor"),
        ("x integer", dict(x=x.long(), num_groups=2), TypeError, "x must be.*int64"),
        ("x 1-D", dict(x=torch.randn(6), num_groups=2), ValueError, "at least 2-D"),
        ("groups not dividing", dict(x=x, num_groups=4), ValueError, "num_groups.*C=6"),
        ("groups zero", dict(x=x, num_groups=0), ValueError, "num_groups"),
        ("groups negative", dict(x=x, num_groups=-2), ValueError, "num_groups"),
        ("groups float", dict(x=x, num_groups=2.0), TypeError, "num_groups must be an int"),
        ("groups bool", dict(x=x, num_groups=True), TypeError, "num_groups must be an int"),
        ("weight shape", dict(x=x, num_groups=2, weight=torch.ones(7)), ValueError, r"weight must have shape \(6,\)"),
        ("weight 2-D", dict(x=x, num_groups=2, weight=torch.ones(1, 6)), ValueError, "weight"),
        ("bias shape", dict(x=x, num_groups=2, weight=w, bias=torch.ones(3)), ValueError, "bias"),
        ("weight a list", dict(x=x, num_groups=2, weight=[1.0] * 6), TypeError, "weight"),
        ("bias integer", dict(x=x, num_groups=2, bias=torch.ones(6, dtype=torch.long)), TypeError, "bias"),
        ("weight device", dict(x=x, num_groups=2, weight=w.to("meta")), ValueError, "weight is on meta"),
        ("eps negative", dict(x=x, num_groups=2, eps=-1e-5), ValueError, "eps"),
        ("eps nan", dict(x=x, num_groups=2, eps=float("nan")), ValueError, "eps"),
        ("eps inf", dict(x=x, num_groups=2, eps=float("inf")), ValueError, "eps"),
        ("eps string", dict(x=x, num_groups=2, eps="1e-5"), TypeError, "eps"),
        ("eps tensor", dict(x=x, num_groups=2, eps=torch.tensor(1e-5)), TypeError, "eps"),
        ("activation gelu", dict(x=x, num_groups=2, activation="gelu"), ValueError, "activation"),
        ("activation case", dict(x=x, num_groups=2, activation="SiLU"), ValueError, "activation"),
        ("activation callable", dict(x=x, num_groups=2, activation=F.silu), ValueError, "activation"),
    ]


@pytest.mark.parametrize("fn", [K.group_norm, K.group_norm_ref], ids=["group_norm", "group_norm_ref"])
@pytest.mark.parametrize("backend", ["ref", "fused", "auto"])
@pytest.mark.parametrize("case, kwargs, exc, match", bad_inputs(), ids=[b[0] for b in bad_inputs()])
def test_bad_input_raises_on_every_backend(fn, backend, case, kwargs, exc, match):
    with K.use_backend(backend), pytest.raises(exc, match=match):
        fn(**kwargs)


# --- the per-(B, C) add term ------------------------------------------------------------------


def _add_term(x, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(x.shape[:2], generator=g) * 3).to(x.dtype).to(x.device)  # (B, C), like a time embedding


def _kernel_sum(x, a):
    """x + a[:, :, None, None] rounded to x's dtype as the fused kernels round it: as torch does, except
    that Triton's interpreter (CPU tensors) rounds float32 to bfloat16 by truncation (the GPU to nearest)."""
    if x.dtype == torch.bfloat16 and not x.is_cuda and GN._interpreting():
        exact = x.float() + a.float()[:, :, None, None]
        return (exact.view(torch.int32) & ~0xFFFF).view(torch.float32).to(x.dtype)
    return x + a[:, :, None, None]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_is_the_norm_of_the_rounded_sum_reference(dtype):
    x, w, b = make_inputs((2, 12, 5, 7), dtype, seed=3)
    a = _add_term(x, 4)
    summed = x + a[:, :, None, None]  # torch's add, rounded to x's dtype
    got = K.group_norm_ref(x, 3, w, b, 1e-5, "silu", add=a)
    expected = K.group_norm_ref(summed, 3, w, b, 1e-5, "silu")
    assert torch.equal(got, expected), (got.double() - expected.double()).abs().max()
    fused = K.group_norm(x, 3, w, b, 1e-5, "silu", add=a)  # the fused kernels under FUSEDIFF_KERNELS=fused
    unfused = K.group_norm(summed if K.get_backend() != "fused" else _kernel_sum(x, a), 3, w, b, 1e-5, "silu")
    assert torch.equal(fused, unfused), (fused.double() - unfused.double()).abs().max()


def test_add_is_checked():
    x, w, b = make_inputs((2, 12, 5, 7), torch.float32, seed=3)
    with pytest.raises(ValueError, match=r"add must have shape \(2, 12\)"):
        K.group_norm(x, 3, w, b, add=torch.zeros(2, 12, 1, 1))
    with pytest.raises(TypeError, match="add must have x's dtype"):
        K.group_norm(x, 3, w, b, add=torch.zeros(2, 12, dtype=torch.float16))
    with pytest.raises(TypeError, match="add must be a torch.Tensor"):
        K.group_norm(x, 3, w, b, add=1.0)


def test_add_gradients_match_the_materialised_sum():
    x, w, b = (t.requires_grad_() for t in make_inputs((2, 12, 5, 7), torch.float64, seed=3))
    a = _add_term(x.detach(), 4).requires_grad_()
    K.group_norm(x, 3, w, b, 1e-5, "silu", add=a).square().sum().backward()
    grads = [t.grad.clone() for t in (x, w, b, a)]
    for t in (x, w, b, a):
        t.grad = None
    K.group_norm(x + a[:, :, None, None], 3, w, b, 1e-5, "silu").square().sum().backward()
    for name, got, t in zip("xwba", grads, (x, w, b, a)):
        torch.testing.assert_close(got, t.grad, msg=lambda m, n=name: f"d{n}: {m}")


@needs_triton
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, num_groups, plan", PLANS[:5], ids=[str(p) for p in PLANS[:5]])
def test_triton_add_equals_the_kernels_on_the_sum(shape, num_groups, plan, dtype, layout):
    """The kernels with add give, bit for bit, what they give on the materialised sum x + add (both plans)."""
    x, w, b = (t.to(TRITON_DEVICE) for t in make_inputs(shape, dtype, seed=sum(shape)))
    x = x.contiguous(memory_format=LAYOUTS[layout])
    a = _add_term(x, 7)[:, :]  # (B, C)
    a_strided = torch.empty(a.shape[1], a.shape[0], dtype=dtype, device=x.device).t().copy_(a)  # other strides
    summed = _kernel_sum(x, a).contiguous(memory_format=LAYOUTS[layout])
    cl = GN._channels_last(x)
    expected = GN._kernels().launch(summed, num_groups, w, b, 1e-5, True, cl, force_plan=plan)
    for add in (a, a_strided):
        got = GN._kernels().launch(x, num_groups, w, b, 1e-5, True, cl, force_plan=plan, add=add)
        diff = (got.double() - expected.double()).abs().max().item()
        assert torch.equal(got, expected), f"{plan} {shape} {dtype} {layout} strides {add.stride()}: differs by {diff}"
