"""The fused scheduler step on the CPU: the C++ path against scheduler_step_ref (the
definition) on random inputs, odd sizes and every dtype; the custom op under opcheck; the
dispatch rules; and bad input, which must raise the same clear exception on every backend."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from support.spy import record_calls
from support.tolerance import assert_within_ref_error

import fusediff._C as C
from fusediff import kernels as K
from fusediff.kernels import scheduler_step_coeffs as SC

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [
    (2, 4, 8, 8),  # a latent, aligned
    (2, 63, 21, 17),  # non-aligned
    (1,),  # a single element
    (7,),  # shorter than one 16-byte vector of any dtype
    (3, 3, 5),  # odd everywhere
    (0, 4),  # empty
    (1, 3, 64, 65),  # tail after the last whole vector
]


def random_coeffs(gen: random.Random, nh: int, clip: bool) -> SC.StepCoeffs:
    u = lambda: gen.uniform(-2.0, 2.0)  # noqa: E731
    return SC.StepCoeffs(p_x=u(), p_m=u(), p_n=u(), c_x=u(), c_m=u(), c_n=u(), c_x0=u(),
                         clip=gen.uniform(0.2, 2.0) if clip else 0.0, **{f"c_h{j}": u() for j in range(nh)})


def make_inputs(shape, dtype, nh, with_noise, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: (torch.randn(shape, generator=g) * 1.5).to(dtype)  # noqa: E731
    return mk(), mk(), (mk() if with_noise else None), [mk() for _ in range(nh)]


def check_against_ref(shape, dtype, nh, with_noise, clip, return_pred, seed):
    x, m, n, hist = make_inputs(shape, dtype, nh, with_noise, seed)
    c = random_coeffs(random.Random(seed), nh, clip)
    with K.use_backend("fused"):
        fused = K.scheduler_step(x, m, c, noise=n, history=hist, return_pred=return_pred)
    ref = K.scheduler_step_ref(x, m, c, noise=n, history=hist, return_pred=return_pred)
    up = lambda t: None if t is None else t.double()  # noqa: E731
    ref64 = K.scheduler_step_ref(up(x), up(m), c, noise=up(n), history=[up(h) for h in hist],
                                 return_pred=return_pred)
    what = f"shape={shape} {dtype} history={nh} noise={with_noise} clip={clip} seed={seed}"
    if return_pred:
        assert_within_ref_error(fused[0], ref[0], ref64[0], what + " prev_sample")
        assert_within_ref_error(fused[1], ref[1], ref64[1], what + " x0")
    else:
        assert_within_ref_error(fused, ref, ref64, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("nh", range(SC.MAX_HISTORY + 1))
def test_cpu_matches_ref_labelled_shapes(shape, dtype, nh):
    check_against_ref(shape, dtype, nh, with_noise=nh % 2 == 0, clip=nh in (1, 3), return_pred=nh > 0, seed=nh)


@given(
    shape=st.lists(st.integers(1, 37), min_size=1, max_size=4).map(tuple),
    dtype=st.sampled_from(DTYPES),
    nh=st.integers(0, SC.MAX_HISTORY),
    with_noise=st.booleans(),
    clip=st.booleans(),
    return_pred=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_cpu_matches_ref_random(shape, dtype, nh, with_noise, clip, return_pred, seed):
    check_against_ref(shape, dtype, nh, with_noise, clip, return_pred, seed)


@pytest.mark.parametrize("rule, args, kwargs, nh, noise", [
    ("ddpm", (0.3, 0.5), dict(prediction_type="v_prediction", noise_std=0.2, clip_sample_range=1.0), 0, True),
    ("ddim", (0.3, 0.5), dict(eta=0.5, prediction_type="sample"), 0, True),
    ("euler", (3.0, 2.0), dict(gamma=0.1), 0, True),
    ("euler_ancestral", (3.0, 2.0), {}, 0, True),
    ("dpmpp_2m", (1.0, 2.0, 4.0), dict(prediction_type="epsilon"), 1, False),
    ("pndm", (0.3, 0.5, SC.plms_weights(4)), {}, 3, False),
])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_rule_cpu_matches_ref(rule, args, kwargs, nh, noise, dtype):
    x, m, n, hist = make_inputs((2, 4, 9, 9), dtype, nh, noise, seed=7)
    c = K.step_coeffs(rule, *args, **kwargs)
    with K.use_backend("fused"):
        fused = K.scheduler_step(x, m, c, noise=n, history=hist)
    ref = K.scheduler_step_ref(x, m, c, noise=n, history=hist)
    up = lambda t: None if t is None else t.double()  # noqa: E731
    ref64 = K.scheduler_step_ref(up(x), up(m), c, noise=up(n), history=[up(h) for h in hist])
    assert_within_ref_error(fused, ref, ref64, f"{rule} {dtype}")


def test_nan_and_inf_propagate_like_ref():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, 1e30])
    m = torch.tensor([1.0, 2.0, 3.0, float("nan"), -1e30])
    c = SC.StepCoeffs(p_x=1.0, p_m=0.5, c_x=0.25, c_x0=2.0, clip=1.5)
    with K.use_backend("fused"):
        fused = K.scheduler_step(x, m, c)
    torch.testing.assert_close(fused, K.scheduler_step_ref(x, m, c), equal_nan=True)


def test_out_may_alias_sample_and_channels_last_keeps_layout():
    x = torch.randn(2, 3, 5, 6).to(memory_format=torch.channels_last)
    m = torch.randn(2, 3, 5, 6).to(memory_format=torch.channels_last)
    c = SC.ddim(0.4, 0.6)
    expect = K.scheduler_step_ref(x, m, c)
    assert expect.is_contiguous(memory_format=torch.channels_last)
    with K.use_backend("fused"):
        got = K.scheduler_step(x, m, c)
        assert got.stride() == x.stride()
        torch.testing.assert_close(got, expect)
        same = K.scheduler_step(x, m, c, out=x)
    assert same.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, expect)


def test_coefficients_as_tensor_list_and_dataclass_agree():
    x, m, n, _ = make_inputs((3, 17), torch.float32, 0, True, seed=3)
    c = SC.ddpm(0.2, 0.4, noise_std=0.3)
    with K.use_backend("fused"):
        outs = [K.scheduler_step(x, m, form, noise=n) for form in (c, c.as_list(), c.to_tensor())]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_custom_op(dtype):
    x, m, n, hist = make_inputs((2, 3, 5), dtype, 2, True, seed=1)
    c = random_coeffs(random.Random(1), 2, clip=True).to_tensor()
    for return_pred in (False, True):
        torch.library.opcheck(torch.ops.fusediff.scheduler_step.default, (x, m, c, n, hist, return_pred))
        torch.library.opcheck(torch.ops.fusediff.scheduler_step.default, (x, m, c, None, [], return_pred))


def test_compiled_step_matches_eager():
    x, m, n, hist = make_inputs((2, 4, 8), torch.float32, 1, True, seed=5)
    c = SC.dpmpp_2m(1.0, 2.0, 3.0).to_tensor()
    step = lambda x, m, n, h, c: K.scheduler_step(x, m, c, noise=n, history=[h])  # noqa: E731
    with K.use_backend("fused"):
        eager = step(x, m, n, hist[0], c)
        compiled = torch.compile(step, backend="eager", fullgraph=True)(x, m, n, hist[0], c)
    torch.testing.assert_close(compiled, eager)


# --- dispatch ------------------------------------------------------------------------------

def test_backend_selection(monkeypatch):
    """FUSEDIFF_KERNELS is read once (reload_environment or use_backend re-read it); use_backend nests."""
    monkeypatch.delenv("FUSEDIFF_KERNELS", raising=False)
    assert K.reload_environment() == "auto"
    assert K.get_backend() == "auto"
    monkeypatch.setenv("FUSEDIFF_KERNELS", "ref")
    assert K.get_backend() == "auto", "the environment is read once, not at every call"
    K.reload_environment()
    assert K.get_backend() == "ref"
    with K.use_backend("fused"):
        assert K.get_backend() == "fused"
        with K.use_backend("auto"):
            assert K.get_backend() == "auto"
        assert K.get_backend() == "fused"
    assert K.get_backend() == "ref"
    monkeypatch.setenv("FUSEDIFF_KERNELS", "fastest")
    with pytest.raises(ValueError, match="FUSEDIFF_KERNELS must be one of auto, fused, ref"):
        K.reload_environment()
    with pytest.raises(ValueError, match="FUSEDIFF_KERNELS must be one of auto, fused, ref"):
        K.get_backend()  # a bad value raises at every call, not only when read
    with pytest.raises(ValueError, match="use_backend"):
        with K.use_backend("triton"):
            pass


def test_dispatch_runs_the_chosen_path(monkeypatch):
    import fusediff.kernels.scheduler_step_ext as ext

    calls = record_calls(monkeypatch, ext, "launch")
    x, m, _, _ = make_inputs((4, 4), torch.float32, 0, False, seed=2)
    c = SC.ddim(0.4, 0.6)
    for backend, fused in [("auto", False), ("ref", False), ("fused", True)]:
        calls.clear()
        with K.use_backend(backend):
            K.scheduler_step(x, m, c)
        assert bool(calls) == fused, backend
    calls.clear()
    with K.use_backend("fused"):  # float64, and tensors needing gradients, go to the reference
        K.scheduler_step(x.double(), m.double(), c)
        K.scheduler_step(x.requires_grad_(), m, c).sum().backward()
    assert not calls and x.grad is not None


# --- bad input -----------------------------------------------------------------------------

def bad_inputs():
    x = torch.randn(2, 3, 4)
    m = torch.randn(2, 3, 4)
    c = SC.ddim(0.4, 0.6)
    return [
        ("shape", dict(sample=x, model_output=m[:, :2], coeffs=c), ValueError, "shape"),
        ("dtype", dict(sample=x, model_output=m.half(), coeffs=c), ValueError, "float16"),
        ("device", dict(sample=x, model_output=m.to("meta"), coeffs=c), ValueError, "meta"),
        ("noncontiguous", dict(sample=x.transpose(1, 2), model_output=m.transpose(1, 2), coeffs=c),
         ValueError, "contiguous"),
        ("stride mismatch", dict(sample=x, model_output=torch.randn(2, 4, 3).transpose(1, 2), coeffs=c),
         ValueError, "strides"),
        ("integer dtype", dict(sample=x.long(), model_output=m.long(), coeffs=c), TypeError, "int64"),
        ("not a tensor", dict(sample=x, model_output=m.tolist(), coeffs=c), TypeError, "list"),
        ("noise shape", dict(sample=x, model_output=m, coeffs=c, noise=torch.randn(3)), ValueError, "noise"),
        ("five history", dict(sample=x, model_output=m, coeffs=c, history=[m] * 5), ValueError, "at most 4"),
        ("history dtype", dict(sample=x, model_output=m, coeffs=c, history=[m.double()]), ValueError, r"history\[0\]"),
        ("coeff count", dict(sample=x, model_output=m, coeffs=[1.0] * 12), ValueError, "14 values"),
        ("coeff tensor dtype", dict(sample=x, model_output=m, coeffs=c.to_tensor().double()), ValueError, "float32"),
        ("out shape", dict(sample=x, model_output=m, coeffs=c, out=torch.empty(2, 3)), ValueError, "out"),
        ("out overlaps", dict(sample=x, model_output=m, coeffs=c, out=x.view(-1)[1:].view(-1)[:0]), ValueError, "out"),
    ]


@pytest.mark.parametrize("backend", ["ref", "fused", "auto"])
@pytest.mark.parametrize("case, kwargs, exc, match", bad_inputs(), ids=[b[0] for b in bad_inputs()])
def test_bad_input_raises_on_every_backend(backend, case, kwargs, exc, match):
    with K.use_backend(backend), pytest.raises(exc, match=match):
        K.scheduler_step(**kwargs)


def test_partial_overlap_of_out_is_refused():
    buf = torch.randn(13)
    x, m = buf[:12], torch.randn(12)
    with pytest.raises(ValueError, match="overlaps"):
        K.scheduler_step(x, m, SC.ddim(0.4, 0.6), out=buf[1:])


def test_unknown_rule_and_bad_rule_arguments():
    with pytest.raises(ValueError, match="unknown update rule 'lms'.*ddim"):
        K.step_coeffs("lms", 0.5, 0.6)
    with pytest.raises(ValueError, match="prediction_type"):
        SC.ddim(0.5, 0.6, prediction_type="x0")
    with pytest.raises(ValueError, match="clip_sample_range"):
        SC.ddpm(0.5, 0.6, clip_sample_range=-1.0)
    with pytest.raises(ValueError, match="first order"):
        SC.dpmpp_2m(0.0, 1.0, 2.0)
    with pytest.raises(ValueError, match="epsilon, v_prediction"):
        SC.pndm(0.5, 0.6, prediction_type="sample")
    with pytest.raises(ValueError, match="1 to 5 weights"):
        SC.pndm(0.5, 0.6, (1.0,) * 6)


def test_extension_rejects_bad_arguments_without_crashing():
    x = torch.randn(8)
    coeffs = [0.0] * C.NUM_COEFFS
    base = dict(sample=x.data_ptr(), model_output=x.data_ptr(), noise=0, history=[], out=x.data_ptr(),
                pred=0, numel=8, dtype=0, coeffs=coeffs)
    for change, match in [(dict(dtype=7), "dtype code"), (dict(numel=-1), "numel"),
                          (dict(sample=0), "null"), (dict(history=[x.data_ptr()] * 5), "at most 4"),
                          (dict(history=[0]), "null")]:
        with pytest.raises(ValueError, match=match):
            C.scheduler_step_cpu(**{**base, **change})
    with pytest.raises(TypeError):
        C.scheduler_step_cpu(**{**base, "coeffs": [0.0] * (C.NUM_COEFFS - 1)})
