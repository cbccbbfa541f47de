"""timestep_embedding against diffusers' get_timestep_embedding, value for value (the same
float32 arithmetic), over labelled widths, timestep dtypes and every option; gradients;
torch.compile; and bad input, which must raise the same clear exception on every backend.

The Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1): every element written, odd
widths and batches, timestep dtypes and strides, against float64 under the house tolerance rule.
In the interpreter numpy's sin/cos/exp stand in for PyTorch's and differ in the last bit, so
there the fused path is held to the tolerance rule instead of to diffusers' exact values."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding
from hypothesis import given, settings
from hypothesis import strategies as st
from support.spy import record_calls
from support.tolerance import ATOL, assert_within_ref_error

from fusediff import kernels as K

TE = sys.modules["fusediff.kernels.timestep_embedding"]  # the module; K.timestep_embedding is the function

TIMESTEP_DTYPES = [torch.int64, torch.int32, torch.float32, torch.float16, torch.bfloat16, torch.float64]
DIMS = [
    1,  # no frequencies: one zero column
    3,  # one frequency and the zero column (with shift 1: a division by 0, refused)
    32,  # small, even
    33,  # odd: zero-padded
    320,  # Stable Diffusion's UNet
    1281,  # wide and odd
]
OPTIONS = [  # (flip_sin_to_cos, downscale_freq_shift, scale, max_period)
    (False, 1.0, 1.0, 10000),  # DDPM
    (True, 0.0, 1.0, 10000),  # ADM / Stable Diffusion
    (True, 0.5, 1000.0, 10000),  # scaled angles, fractional shift
    (False, -1.0, 0.25, 37),  # negative shift, short period
]


def timesteps_of(dtype, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        t = torch.rand(n, generator=g, dtype=torch.float64) * 1000.0  # fractional timesteps
        return torch.cat([t, torch.tensor([0.0, 999.0, -3.5], dtype=torch.float64)]).to(dtype)
    return torch.cat([torch.randint(0, 1000, (n,), generator=g), torch.tensor([0, 999, -3])]).to(dtype)


def angles_fp64(t, dim, shift, scale, max_period):
    """a = scale * t * omega_j in float64 from float64 timesteps: (N, dim // 2)."""
    half = dim // 2
    omega = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - shift)) if half \
        else torch.zeros(0, dtype=torch.float64)
    return scale * (t.cpu().double()[:, None] * omega[None, :])


def embedding_fp64(t, dim, flip, shift, scale, max_period):
    """The sinusoid in float64 from float64 timesteps: what the float32 results are measured against."""
    a = angles_fp64(t, dim, shift, scale, max_period)
    parts = [a.cos(), a.sin()] if flip else [a.sin(), a.cos()]
    return torch.cat(parts + [torch.zeros(t.shape[0], dim % 2, dtype=torch.float64)], dim=-1)


def assert_kernel_within_rule(got, ref, t, args, what):
    """The house tolerance rule against float64, widened in the interpreter by two float32 ulps of each angle.

    There numpy's exp may put omega_j one ulp from PyTorch's; that moves a = scale * t * omega_j by up to
    ulp(a) and sin(a), cos(a) by as much, which a small batch's reference error need not cover. On CUDA
    the kernel runs PyTorch's functions and the plain rule applies.
    """
    dim = args[0]
    hi = embedding_fp64(t, *args)
    if got.is_cuda:
        assert_within_ref_error(got, ref, hi, what)
        return
    a = angles_fp64(t, dim, *args[2:]).abs()
    widen = torch.cat([a, a, torch.zeros(t.shape[0], dim % 2, dtype=torch.float64)], dim=-1) * 2.0**-22
    f, r = got.double(), ref.double()
    assert got.shape == hi.shape and torch.equal(torch.isnan(f), torch.isnan(hi)), f"{what}: shape or NaN differ"
    f, r, hi = (x.nan_to_num(0.0) for x in (f, r, hi))
    err_ref = (r - hi).abs().max().item() if r.numel() else 0.0
    excess = (f - hi).abs() - (2 * err_ref + ATOL[torch.float32] + widen)
    if excess.numel() and excess.max().item() > 0:
        idx = tuple(int(i) for i in torch.nonzero(excess == excess.max())[0])
        raise AssertionError(f"{what}: at {idx} kernel {f[idx].item():.6g}, fp64 {hi[idx].item():.6g}, reference "
                             f"{r[idx].item():.6g} (its largest error {err_ref:.3e}), bound exceeded by "
                             f"{excess[idx].item():.3e}; {int((excess > 0).sum())} of {excess.numel()} elements beyond")


def kernel_runs(t, backend="fused"):
    """Whether K.timestep_embedding(t, ...) runs the Triton kernel under ``backend``."""
    with K.use_backend(backend):
        return t.shape[0] > 0 and TE._use_fused(t, (t,))


def assert_same_or_within_rule(got, expect, t, args, what):
    """Exactly diffusers' values, or, where the interpreter ran the kernel, within the (widened) tolerance rule."""
    if kernel_runs(t):
        assert_kernel_within_rule(got, expect, t, args, f"{what} (Triton interpreter)")
    else:
        torch.testing.assert_close(got, expect, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")


def check_against_diffusers(t, dim, flip, shift, scale, max_period, what):
    if dim // 2 >= 1 and dim // 2 == shift:  # diffusers divides by 0 here (NaN); ours raises
        with pytest.raises(ValueError, match="downscale_freq_shift"):
            K.timestep_embedding(t, dim, flip, shift, scale, max_period)
        return
    with K.use_backend("fused"):
        got = K.timestep_embedding(t, dim, flip, shift, scale, max_period)
    expect = get_timestep_embedding(t, dim, flip, shift, scale, max_period)
    assert got.dtype == torch.float32 and got.shape == (t.shape[0], dim), (got.dtype, got.shape)
    assert_same_or_within_rule(got, expect, t, (dim, flip, shift, scale, max_period), what)


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("dtype", TIMESTEP_DTYPES, ids=str)
def test_matches_diffusers_exactly(dtype, dim, options):
    check_against_diffusers(timesteps_of(dtype), dim, *options, f"{dtype} dim={dim} options={options}")


@settings(max_examples=30)
@given(
    n=st.integers(0, 9),
    dim=st.integers(1, 300),
    flip=st.booleans(),
    shift=st.sampled_from([0.0, 1.0, 0.5, -2.0, 3.0]),
    scale=st.floats(-1e3, 1e3),
    max_period=st.sampled_from([1, 2, 100, 10000, 12345.5]),
    dtype=st.sampled_from(TIMESTEP_DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_diffusers_random(n, dim, flip, shift, scale, max_period, dtype, seed):
    t = timesteps_of(dtype, n, seed)[:n]
    what = f"n={n} dim={dim} flip={flip} shift={shift} scale={scale} max_period={max_period} {dtype}"
    check_against_diffusers(t, dim, flip, shift, scale, max_period, what)


def test_layout_by_hand():
    # t = 2, dim = 5: half = 2 frequencies omega = (1, 10000^(-1/(2-1))), then a zero column
    emb = K.timestep_embedding(torch.tensor([2]), 5)
    a = torch.tensor([2.0, 2.0 * 1e-4])
    torch.testing.assert_close(emb[0], torch.cat([a.sin(), a.cos(), torch.zeros(1)]))
    flipped = K.timestep_embedding(torch.tensor([2]), 5, flip_sin_to_cos=True)
    torch.testing.assert_close(flipped[0], torch.cat([a.cos(), a.sin(), torch.zeros(1)]))


def test_ref_is_the_same_function():
    t, args = timesteps_of(torch.float32), (33, True, 0.0, 2.0, 500)
    ref = K.timestep_embedding_ref(t, *args)
    with K.use_backend("ref"):
        torch.testing.assert_close(K.timestep_embedding(t, *args), ref, rtol=0, atol=0)
    got = K.timestep_embedding(t, *args)  # the backend in force: the kernel under FUSEDIFF_KERNELS=fused
    if kernel_runs(t, K.get_backend()):
        assert_kernel_within_rule(got, ref, t, args, "kernel against its reference")
    else:
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_gradient_wrt_float_timesteps():
    # the output is float32 by definition (as in diffusers), so the gradient is checked against
    # its closed form, d/dt sin(s t w) = s w cos(s t w) and d/dt cos(s t w) = -s w sin(s t w),
    # and against autograd through diffusers, instead of a float64 gradcheck
    t = torch.tensor([0.0, 1.5, 250.25, 999.0], requires_grad=True)
    dim, shift, scale = 9, 1.0, 0.5
    weights = torch.linspace(-1, 1, 4 * dim).view(4, dim)
    (K.timestep_embedding(t, dim, False, shift, scale) * weights).sum().backward()
    half = dim // 2
    omega = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - shift))
    a = scale * t.detach().double()[:, None] * omega
    closed = (weights[:, :half].double() * scale * omega * a.cos()
              - weights[:, half:2 * half].double() * scale * omega * a.sin()).sum(-1)
    torch.testing.assert_close(t.grad.double(), closed, rtol=1e-4, atol=1e-4)
    t2 = t.detach().clone().requires_grad_()
    (get_timestep_embedding(t2, dim, False, shift, scale) * weights).sum().backward()
    torch.testing.assert_close(t.grad, t2.grad, rtol=0, atol=0)


def test_compile_fullgraph():
    t = timesteps_of(torch.int64)
    compiled = torch.compile(K.timestep_embedding, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(t, 33, True, 0.0), K.timestep_embedding(t, 33, True, 0.0))


# --- the Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1) ----------------------

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or TE._interpreting()) or not TE._have_triton(),
    reason="the Triton kernel runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1")
KERNEL_DTYPES = [torch.int32, torch.int64, torch.float16, torch.float32]
KERNEL_DIMS = [
    1,  # no frequencies: the zero column only
    2,  # one frequency, no zero column (shift 0 only: half - shift = 0 otherwise)
    3,  # one frequency and the zero column
    5,  # two frequencies, odd
    127,  # odd, below one block of frequencies
    320,  # Stable Diffusion's UNet
    321,  # odd: 160 frequencies and the zero column
    1281,  # odd, 640 frequencies: three blocks of 256 (MAX_BLOCK_J), the zero column in the first
]
KERNEL_BATCHES = [1, 3, 17, 1000]
KERNEL_OPTIONS = [  # (flip_sin_to_cos, downscale_freq_shift, scale, max_period)
    (False, 1.0, 1.0, 10000),  # DDPM
    (True, 0.0, 1.0, 10000),  # ADM / Stable Diffusion
    (True, 1.0, 3.5, 37),  # scaled angles, short period
]


def kernel_timesteps(dtype, n, seed):
    """n timesteps of ``dtype`` on the kernel's device: integers beyond 2^24 for int64, fractions for floats."""
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        t = torch.rand(n, generator=g, dtype=torch.float64) * 1000.0
    else:
        t = torch.randint(-5, 1000, (n,), generator=g, dtype=torch.int64)
        if dtype == torch.int64 and n >= 3:
            t[:3] = torch.tensor([2**24 + 1, 2**40 + 12345, -(2**33) - 7])  # rounded to float32 in the kernel
    return t.to(dtype).to(TRITON_DEVICE)


def triton_embedding(t, dim, flip, shift, scale, max_period, out=None):
    return TE._kernels().launch(t, dim, flip, shift, scale, max_period, out=out)


def check_kernel(t, dim, options, what, out=None):
    got = triton_embedding(t, dim, *options, out=out)
    assert got.shape == (t.shape[0], dim) and got.dtype == torch.float32, (got.shape, got.dtype)
    assert_kernel_within_rule(got, TE._ref(t, dim, *options), t, (dim, *options), what)
    return got


@needs_triton
@pytest.mark.parametrize("n", KERNEL_BATCHES)
@pytest.mark.parametrize("dim", KERNEL_DIMS)
def test_triton_writes_every_element(dim, n):
    for dtype in KERNEL_DTYPES:
        t = kernel_timesteps(dtype, n, seed=dim * n)
        for options in KERNEL_OPTIONS:
            if dim // 2 >= 1 and dim // 2 == options[1]:
                continue  # refused by validation
            out = torch.full((n, dim), float("nan"), device=TRITON_DEVICE)  # a missed element stays NaN
            got = check_kernel(t, dim, options, f"dim={dim} N={n} {dtype} options={options}", out=out)
            assert got is out


@needs_triton
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.bfloat16, torch.float64], ids=str)
def test_triton_other_timestep_dtypes(dtype):
    t = kernel_timesteps(dtype, 9, seed=1) if dtype not in (torch.int8, torch.uint8) \
        else torch.arange(0, 117, 13, device=TRITON_DEVICE).to(dtype)
    check_kernel(t, 33, KERNEL_OPTIONS[1], f"{dtype} timesteps")


@needs_triton
@pytest.mark.parametrize("layout", ["every third", "a column", "one value expanded"])
def test_triton_strided_timesteps(layout):
    base = kernel_timesteps(torch.int64, 60, seed=2)
    t = {"every third": base[::3], "a column": base.view(20, 3)[:, 1],
         "one value expanded": base[7:8].expand(5)}[layout]
    assert not t.is_contiguous() and t.dim() == 1
    got = check_kernel(t, 64, KERNEL_OPTIONS[0], f"timesteps {layout}, stride {t.stride()}")
    torch.testing.assert_close(got, triton_embedding(t.contiguous(), 64, *KERNEL_OPTIONS[0]), rtol=0, atol=0)


@needs_triton
def test_triton_large_angles():
    # scale * t up to 1e6: the float32 angle is off by up to ~0.03 in both; the rule still binds
    t = kernel_timesteps(torch.float32, 64, seed=3)
    check_kernel(t, 32, (True, 0.0, 1000.0, 10000), "scale 1000")


@needs_triton
def test_public_function_runs_the_kernel_and_the_custom_op_checks(monkeypatch):
    t = kernel_timesteps(torch.int64, 6, seed=4)
    calls = record_calls(monkeypatch, TE._kernels(), "launch")
    with K.use_backend("fused"):
        K.timestep_embedding(t, 33, True, 0.0)
        K.timestep_embedding(t.float()[::2], 10)  # strided float32: the kernel
        K.timestep_embedding(t[:0], 8)  # empty: the reference
        K.timestep_embedding(t.to(torch.float8_e4m3fn), 8)  # a dtype the kernel does not load: the reference
        K.timestep_embedding(t.float().requires_grad_(), 8)  # autograd: the reference
    with K.use_backend("ref"):
        K.timestep_embedding(t, 12)
    assert [a[1] for a in calls] == [33, 10], calls
    torch.library.opcheck(torch.ops.fusediff.timestep_embedding, (t, 33, True, 0.0, 1.0, 10000.0))
    t16 = kernel_timesteps(torch.float16, 8, seed=4)[::2]
    torch.library.opcheck(torch.ops.fusediff.timestep_embedding, (t16, 8, False, 1.0, 2.0, 100.0))
    assert torch.ops.fusediff.timestep_embedding(t[:0], 5, True, 0.0, 1.0, 10000.0).shape == (0, 5)


@needs_triton
def test_triton_under_compile_fullgraph(monkeypatch):
    t = kernel_timesteps(torch.int64, 5, seed=5)
    calls = record_calls(monkeypatch, TE._kernels(), "launch")
    with K.use_backend("fused"):
        compiled = torch.compile(lambda t: K.timestep_embedding(t, 33, True, 0.0), backend="aot_eager",
                                 fullgraph=True)
        got = compiled(t)
        eager = K.timestep_embedding(t, 33, True, 0.0)
    assert len(calls) >= 2, "the compiled graph did not reach the kernel"
    torch.testing.assert_close(got, eager, rtol=0, atol=0)


# --- bad input -----------------------------------------------------------------------------

def bad_inputs():
    t = torch.arange(4)
    return [
        ("not a tensor", dict(timesteps=[1, 2], dim=8), TypeError, "timesteps must be a torch.Tensor"),
        ("bool timesteps", dict(timesteps=t > 1, dim=8), TypeError, "torch.bool"),
        ("complex timesteps", dict(timesteps=t.to(torch.complex64), dim=8), TypeError, "complex64"),
        ("0-D timesteps", dict(timesteps=torch.tensor(5), dim=8), ValueError, "1-D"),
        ("2-D timesteps", dict(timesteps=t.view(2, 2), dim=8), ValueError, "1-D"),
        ("dim 0", dict(timesteps=t, dim=0), ValueError, "dim must be >= 1"),
        ("dim negative", dict(timesteps=t, dim=-4), ValueError, "dim must be >= 1"),
        ("dim float", dict(timesteps=t, dim=8.0), TypeError, "dim must be an int"),
        ("dim bool", dict(timesteps=t, dim=True), TypeError, "dim must be an int"),
        ("half == shift", dict(timesteps=t, dim=2), ValueError, "dim // 2 - downscale_freq_shift"),
        ("half == shift, odd", dict(timesteps=t, dim=9, downscale_freq_shift=4.0), ValueError, "dim=9"),
        ("flip not bool", dict(timesteps=t, dim=8, flip_sin_to_cos="yes"), TypeError, "flip_sin_to_cos"),
        ("shift nan", dict(timesteps=t, dim=8, downscale_freq_shift=float("nan")), ValueError,
         "downscale_freq_shift must be finite"),
        ("shift string", dict(timesteps=t, dim=8, downscale_freq_shift="1"), TypeError, "downscale_freq_shift"),
        ("scale inf", dict(timesteps=t, dim=8, scale=float("inf")), ValueError, "scale must be finite"),
        ("scale tensor", dict(timesteps=t, dim=8, scale=torch.tensor(1.0)), TypeError, "scale"),
        ("max_period 0", dict(timesteps=t, dim=8, max_period=0), ValueError, "max_period must be > 0"),
        ("max_period negative", dict(timesteps=t, dim=8, max_period=-10.0), ValueError, "max_period"),
    ]


@pytest.mark.parametrize("fn", [K.timestep_embedding, K.timestep_embedding_ref],
                         ids=["timestep_embedding", "timestep_embedding_ref"])
@pytest.mark.parametrize("backend", ["ref", "fused", "auto"])
@pytest.mark.parametrize("case, kwargs, exc, match", bad_inputs(), ids=[b[0] for b in bad_inputs()])
def test_bad_input_raises_on_every_backend(fn, backend, case, kwargs, exc, match):
    with K.use_backend(backend), pytest.raises(exc, match=match):
        fn(**kwargs)
