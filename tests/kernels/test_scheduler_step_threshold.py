"""The fused scheduler step's per-element noise scale (``variance=``, DDPM's learned_range) and
per-item dynamic thresholding (``threshold=``) on the CPU: the C++ path against scheduler_step_ref
(the definition) for every dtype, batch-strided views, odd sizes, ties, NaN items, ratio 1 and
integral ranks; the reference against torch.quantile written out and diffusers' ``_threshold_sample``;
the custom op under opcheck and torch.compile; bad input on every backend."""

from __future__ import annotations

import random
from fractions import Fraction

import diffusers
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from support.tolerance import assert_within_ref_error

import fusediff._C as C
from fusediff import kernels as K
from fusediff.kernels import _ext
from fusediff.kernels import scheduler_step_coeffs as SC
from fusediff.kernels.scheduler_step_ext import quantile_rank

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [
    (2, 4, 8, 8),  # a latent, aligned
    (3, 5, 7, 9),  # odd: inner (315) not a multiple of 8
    (1, 3, 64, 65),  # one item
    (8, 3, 4, 4),  # B = 8
    (2, 1),  # one element per item
    (5, 13),  # 2-D
]


def rand(shape, dtype, g, scale=1.5):
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def halves(shape, dtype, g):
    """(model output, variance) as the two halves of a (B, 2C, ...) tensor split along dim 1."""
    both = torch.cat([rand(shape, dtype, g), torch.rand(shape, generator=g).mul(2).sub(1).to(dtype)], dim=1)
    return both[:, : shape[1]], both[:, shape[1]:]


def coeffs_for(seed, noise=True, threshold=False):
    r = random.Random(seed)
    u = lambda: r.uniform(-2.0, 2.0)  # noqa: E731
    return SC.StepCoeffs(p_x=u(), p_m=u(), p_n=u() if noise else 0.0, c_x=u(), c_m=u(), c_n=u() if noise else 0.0,
                         c_x0=u(), clip=0.0 if threshold else r.uniform(0.2, 2.0),
                         v_a=r.uniform(-3.0, 0.0), v_b=r.uniform(-1.0, 1.0))


def check(x, m, c, *, noise=None, variance=None, threshold=None, history=(), what=""):
    """fused (C++) against the reference at the same precision and in float64."""
    kw = dict(noise=noise, variance=variance, threshold=threshold, history=history, return_pred=True)
    with K.use_backend("fused"):
        fused = K.scheduler_step(x, m, c, **kw)
    ref = K.scheduler_step_ref(x, m, c, **kw)
    up = lambda t: None if t is None else t.double()  # noqa: E731
    ref64 = K.scheduler_step_ref(up(x), up(m), c, noise=up(noise), variance=up(variance), threshold=threshold,
                                 history=[up(h) for h in history], return_pred=True)
    assert_within_ref_error(fused[0], ref[0], ref64[0], what + " prev_sample")
    assert_within_ref_error(fused[1], ref[1], ref64[1], what + " x0")
    return fused, ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", ["variance", "threshold", "both", "both-strided", "threshold-history"])
def test_cpu_matches_ref_labelled_shapes(shape, dtype, case):
    g = torch.Generator().manual_seed(len(shape) + shape[0])
    x, n = rand(shape, dtype, g), rand(shape, dtype, g)
    if case == "both-strided":
        m, v = halves(shape, dtype, g)
    else:
        m, v = rand(shape, dtype, g), torch.rand(shape, generator=g).mul(2).sub(1).to(dtype)
    thresholded = case != "variance"
    c = coeffs_for(shape[0], threshold=thresholded)
    threshold = (0.9, 1.7) if thresholded else None
    history = [rand(shape, dtype, g)] if case == "threshold-history" else ()
    check(x, m, c, noise=n, variance=None if case in ("threshold", "threshold-history") else v,
          threshold=threshold, history=history, what=f"{shape} {dtype} {case}")


@given(
    shape=st.lists(st.integers(1, 19), min_size=2, max_size=4).map(tuple),
    dtype=st.sampled_from(DTYPES),
    with_variance=st.booleans(),
    strided=st.booleans(),
    ratio=st.one_of(st.just(1.0), st.floats(0.01, 1.0)),
    max_value=st.floats(1.0, 4.0),
    thresholded=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_cpu_matches_ref_random(shape, dtype, with_variance, strided, ratio, max_value, thresholded, seed):
    g = torch.Generator().manual_seed(seed)
    x, n = rand(shape, dtype, g), rand(shape, dtype, g)
    m, v = halves(shape, dtype, g) if strided else (rand(shape, dtype, g), rand(shape, dtype, g, 0.5))
    c = coeffs_for(seed, threshold=thresholded)
    check(x, m, c, noise=n, variance=v if with_variance else None,
          threshold=(ratio, max_value) if thresholded else None,
          what=f"{shape} {dtype} variance={with_variance} strided={strided} ratio={ratio} max={max_value}")


def threshold_formula(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding as Saharia et al. 2022 (sec. 2.3) state it, with torch.quantile, per item."""
    flat = x0.reshape(x0.shape[0], -1).float()
    s = torch.quantile(flat.abs(), ratio, dim=1, keepdim=True).clamp(min=1.0, max=max_value)
    return (flat.clamp(-s, s) / s).reshape(x0.shape).to(x0.dtype)


def x0_is_m(shape, dtype, m):
    """Inputs whose x0 is exactly m (p_m = 1), so the thresholded x0 can be compared bit for bit."""
    return torch.zeros(shape, dtype=dtype), m, SC.StepCoeffs(p_m=1.0, c_x0=1.0)


def tied(shape, dtype, g):
    return (torch.randint(-4, 5, shape, generator=g) * 0.75).to(dtype)  # few distinct values: many ties


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ratio, n", [
    (0.995, 315),  # diffusers' default, fractional rank
    (1.0, 315),  # the maximum
    (0.5, 11),  # rank exactly 5
    (0.9, 11),  # rank 9 (0.9 rounds to float32 first)
    (0.95, 1),  # one element per item
    (1e-6, 40),  # the minimum
])
@pytest.mark.parametrize("values", ["normal", "ties", "small"])
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="torch's CPU lerp is a fused multiply-add only in its AVX2/AVX-512 kernels")
def test_thresholded_x0_is_bit_exact(dtype, ratio, n, values):
    """With x0 = m the fused x0 equals the reference, the quantile formula and diffusers' _threshold_sample
    exactly."""
    g = torch.Generator().manual_seed(n)
    shape = (20, 1, n)  # diffusers' _threshold_sample takes (B, C, ...); 20 items: torch's vectorised lerp too
    m = {"normal": rand(shape, dtype, g, 2.0), "ties": tied(shape, dtype, g),
         "small": rand(shape, dtype, g, 0.1)}[values]  # small: s clamps to 1
    x, m, c = x0_is_m(shape, dtype, m)
    with K.use_backend("fused"):
        _, fused = K.scheduler_step(x, m, c, threshold=(ratio, 1.8), return_pred=True)
    _, ref = K.scheduler_step_ref(x, m, c, threshold=(ratio, 1.8), return_pred=True)
    theirs = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=1.8)
    for name, other in [("ref", ref), ("formula", threshold_formula(m, ratio, 1.8)),
                        ("diffusers", theirs._threshold_sample(m))]:
        assert torch.equal(fused, other), f"{name}: max diff {(fused.float() - other.float()).abs().max()}"


def fma32(a: float, b: float, c: float) -> float:
    """a*b + c rounded once to float32."""
    return torch.tensor(float(Fraction(a) * Fraction(b) + Fraction(c)), dtype=torch.float64).float().item()


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="torch's CPU lerp is a fused multiply-add only in its AVX2/AVX-512 kernels")
def test_quantile_rank_and_lerp_match_torch():
    """(below, above, weight) read the sorted values where torch.quantile does (rank in float32), and its
    lerp is one fused multiply-add (as the fused kernels compute it)."""
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 10, 11, 100, 315, 4097, 196608):
        values = torch.rand(n, generator=g)
        srt = values.sort().values.tolist()
        for ratio in (1e-6, 0.1, 0.5, 0.9, 0.95, 0.995, 0.999999, 1.0):
            below, above, w = quantile_rank(n, ratio)
            assert 0 <= below <= above <= below + 1 and above < n and 0 <= w < 1
            a, b = srt[below], srt[above]
            d = torch.tensor(b).sub(a).item()  # float32 difference
            lerp = fma32(w, d, a) if w < 0.5 else fma32(w - 1, d, b)
            assert lerp == torch.quantile(values, ratio).item(), (n, ratio, below, above, w)


def test_nan_item_gives_nan_and_leaves_the_others():
    g = torch.Generator().manual_seed(3)
    m = rand((3, 2, 5), torch.float32, g)
    m[1, 1, 2] = float("nan")
    x, m, c = x0_is_m((3, 2, 5), torch.float32, m)
    with K.use_backend("fused"):
        _, fused = K.scheduler_step(x, m, c, threshold=(0.9, 2.0), return_pred=True)
    assert torch.isnan(fused[1]).all() and not torch.isnan(fused[0]).any() and not torch.isnan(fused[2]).any()
    torch.testing.assert_close(fused, K.dynamic_threshold_ref(m, 0.9, 2.0), rtol=0, atol=0, equal_nan=True)
    inf = m.clone()
    inf[1] = float("inf")  # an inf item: s = max_value, all elements clamp to +-1
    with K.use_backend("fused"):
        _, got = K.scheduler_step(x, inf, c, threshold=(0.9, 2.0), return_pred=True)
    torch.testing.assert_close(got, K.dynamic_threshold_ref(inf, 0.9, 2.0), rtol=0, atol=0, equal_nan=True)


def test_variance_scales_the_noise_everywhere_it_is_used():
    """n is replaced by n*exp(v_a + v_b*v) in x0 (p_n) and in the update (c_n)."""
    g = torch.Generator().manual_seed(4)
    x, m, n, v = (rand((2, 3, 5), torch.float32, g) for _ in range(4))
    c = SC.StepCoeffs(p_x=0.5, p_n=0.7, c_x0=1.5, c_n=-0.25, v_a=-0.5, v_b=0.3)
    scaled = n * torch.exp(-0.5 + 0.3 * v)
    expect = K.scheduler_step_ref(x, m, c._replace(v_a=0.0, v_b=0.0), noise=scaled, return_pred=True)
    for backend in ("ref", "fused"):
        with K.use_backend(backend):
            got = K.scheduler_step(x, m, c, noise=n, variance=v, return_pred=True)
        for a, b in zip(got, expect):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_batch_strided_views_are_read_in_place(monkeypatch):
    """Halves of a (B, 2C, H, W) output go to the kernel as they are (no copy) and give the same result."""
    import fusediff.kernels.scheduler_step_ext as ext

    g = torch.Generator().manual_seed(5)
    shape = (3, 4, 5, 6)
    x, n = rand(shape, torch.float16, g), rand(shape, torch.float16, g)
    m, v = halves(shape, torch.float16, g)
    assert not m.is_contiguous() and m.stride()[1:] == x.stride()[1:]
    c = coeffs_for(1, threshold=True)
    seen = []
    real = ext.launch
    monkeypatch.setattr(ext, "launch", lambda *a: seen.append((a[1].data_ptr(), a[7].data_ptr())) or real(*a))
    with K.use_backend("fused"):
        views = K.scheduler_step(x, m, c, noise=n, variance=v, threshold=(0.95, 1.5), return_pred=True)
        dense = K.scheduler_step(x, m.contiguous(), c, noise=n, variance=v.contiguous(), threshold=(0.95, 1.5),
                                 return_pred=True)
    assert seen[0] == (m.data_ptr(), v.data_ptr())
    for a, b in zip(views, dense):
        assert torch.equal(a, b)


def test_opcheck_with_variance_and_threshold():
    g = torch.Generator().manual_seed(6)
    shape = (2, 3, 5)
    x, n = rand(shape, torch.float32, g), rand(shape, torch.float32, g)
    m, v = halves(shape, torch.float32, g)
    c = coeffs_for(2, threshold=True).to_tensor()
    op = torch.ops.fusediff.scheduler_step.default
    for dtype in DTYPES:
        args = [t.to(dtype) for t in (x, m, n)]
        torch.library.opcheck(op, (args[0], args[1], c, args[2], [], True, v.to(dtype), 0.9, 1.5))
        torch.library.opcheck(op, (args[0], m.to(dtype), c, args[2], [], False, None, 0.995, 1.0))
    torch.library.opcheck(op, (x, m, c, n, [n], True, v, 0.0, 1.0))  # strided views, no threshold


def test_compiled_step_with_variance_and_threshold_matches_eager():
    g = torch.Generator().manual_seed(7)
    shape = (2, 3, 4, 4)
    x, n = rand(shape, torch.float32, g), rand(shape, torch.float32, g)
    both = torch.cat([rand(shape, torch.float32, g), rand(shape, torch.float32, g, 0.5)], dim=1)
    c = coeffs_for(3, threshold=True).to_tensor()

    def step(x, both, n, c):
        m, v = both.split(shape[1], dim=1)
        return K.scheduler_step(x, m, c, noise=n, variance=v, threshold=(0.9, 1.5), return_pred=True)

    with K.use_backend("fused"):
        eager = step(x, both, n, c)
        compiled = torch.compile(step, backend="eager", fullgraph=True)(x, both, n, c)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- bad input -----------------------------------------------------------------------------

def bad_inputs():
    x, m, n = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    c = SC.ddpm(0.4, 0.6, noise_std=0.5)
    clipped = SC.ddpm(0.4, 0.6, clip_sample_range=1.0)
    wide = torch.randn(2, 6, 4)
    cl = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    return [
        ("variance without noise", dict(sample=x, model_output=m, coeffs=c, variance=m), ValueError, "needs noise"),
        ("variance shape", dict(sample=x, model_output=m, coeffs=c, noise=n, variance=m[:, :2]), ValueError,
         "variance"),
        ("variance dtype", dict(sample=x, model_output=m, coeffs=c, noise=n, variance=m.half()), ValueError,
         "variance"),
        ("variance transposed", dict(sample=x, model_output=m, coeffs=c, noise=n,
                                     variance=torch.randn(2, 4, 3).transpose(1, 2)), ValueError, "strides"),
        ("noise batch-strided", dict(sample=x, model_output=m, coeffs=c, noise=wide[:, :3]), ValueError, "noise"),
        ("strided view on channels-last", dict(sample=cl, model_output=torch.randn(2, 6, 4, 5)[:, :3], coeffs=c),
         ValueError, "strides"),
        ("ratio 0", dict(sample=x, model_output=m, coeffs=c, threshold=(0.0, 1.0)), ValueError, r"\(0, 1\]"),
        ("ratio above 1", dict(sample=x, model_output=m, coeffs=c, threshold=(1.5, 1.0)), ValueError, r"\(0, 1\]"),
        ("ratio NaN", dict(sample=x, model_output=m, coeffs=c, threshold=(float("nan"), 1.0)), ValueError, "ratio"),
        ("max_value below 1", dict(sample=x, model_output=m, coeffs=c, threshold=(0.9, 0.5)), ValueError,
         "max_value"),
        ("threshold not a pair", dict(sample=x, model_output=m, coeffs=c, threshold=0.9), TypeError, "pair"),
        ("threshold and clip", dict(sample=x, model_output=m, coeffs=clipped, threshold=(0.9, 1.0)), ValueError,
         "replaces clipping"),
        ("threshold 1-D", dict(sample=x.view(-1), model_output=m.view(-1), coeffs=c, threshold=(0.9, 1.0)),
         ValueError, "batch dimension"),
    ]


@pytest.mark.parametrize("backend", ["ref", "fused", "auto"])
@pytest.mark.parametrize("case, kwargs, exc, match", bad_inputs(), ids=[b[0] for b in bad_inputs()])
def test_bad_input_raises_on_every_backend(backend, case, kwargs, exc, match):
    with K.use_backend(backend), pytest.raises(exc, match=match):
        K.scheduler_step(**kwargs)


def test_out_overlapping_a_batch_strided_input_is_refused():
    both = torch.randn(2, 6, 4)
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="overlaps"):  # out is the dense first 24 elements: items 0 and half of 1
        K.scheduler_step(x, both[:, :3], SC.ddim(0.4, 0.6), out=both.view(-1)[:24].view(2, 3, 4))


def test_extension_rejects_bad_new_arguments_without_crashing():
    x = torch.randn(8)
    base = dict(sample=x.data_ptr(), model_output=x.data_ptr(), noise=x.data_ptr(), history=[], out=x.data_ptr(),
                pred=0, numel=8, dtype=0, coeffs=[0.0] * C.NUM_COEFFS, batch=2)
    for change, match in [(dict(noise=0, variance=x.data_ptr()), "needs noise"), (dict(batch=3), "divide"),
                          (dict(batch=0), "batch"), (dict(m_batch_stride=-2), "stride"),
                          (dict(threshold=(3, 4, 0.5, 1.0)), "ranks"), (dict(threshold=(1, 3, 0.5, 1.0)), "ranks"),
                          (dict(threshold=(1, 2, 1.5, 1.0)), "weight"), (dict(threshold=(1, 2, 0.5, 0.5)), "max_value")]:
        with pytest.raises(ValueError, match=match):
            C.scheduler_step_cpu(**{**base, **change})
    with pytest.raises(TypeError):  # the old 12-coefficient vector
        C.scheduler_step_cpu(**{**base, "coeffs": [0.0] * 12})


def test_extension_from_another_build_fails_clearly(monkeypatch):
    """A _C built for 12 coefficients must not be handed 14: require() says so."""
    class Old:
        NUM_COEFFS = 12

        @staticmethod
        def cuda_built():
            return False

    _ext.require.cache_clear()
    monkeypatch.setattr(_ext, "_load", lambda: (Old, ""))
    try:
        with pytest.raises(RuntimeError, match="another build.*12 step coefficients"):
            _ext.require()
        x = torch.randn(4)
        with K.use_backend("fused"), pytest.raises(RuntimeError, match="another build"):
            K.scheduler_step(x, x, SC.ddim(0.4, 0.6))
    finally:
        _ext.require.cache_clear()
