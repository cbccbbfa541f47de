"""timestep_embedding against diffusers' get_timestep_embedding, value for value (the same
float32 arithmetic), over labelled widths, timestep dtypes and every option; gradients;
torch.compile; and bad input, which must raise the same clear exception on every backend."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding
from hypothesis import given, settings
from hypothesis import strategies as st

from fusediff import kernels as K

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


def check_against_diffusers(t, dim, flip, shift, scale, max_period, what):
    if dim // 2 >= 1 and dim // 2 == shift:  # diffusers divides by 0 here (NaN); ours raises
        with pytest.raises(ValueError, match="downscale_freq_shift"):
            K.timestep_embedding(t, dim, flip, shift, scale, max_period)
        return
    with K.use_backend("fused"):
        got = K.timestep_embedding(t, dim, flip, shift, scale, max_period)
    expect = get_timestep_embedding(t, dim, flip, shift, scale, max_period)
    assert got.dtype == torch.float32 and got.shape == (t.shape[0], dim), (got.dtype, got.shape)
    torch.testing.assert_close(got, expect, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")


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
    t = timesteps_of(torch.float32)
    torch.testing.assert_close(K.timestep_embedding_ref(t, 33, True, 0.0, 2.0, 500),
                               K.timestep_embedding(t, 33, True, 0.0, 2.0, 500), rtol=0, atol=0)


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
