"""group_norm's fused backward (Triton, CPU tensors under TRITON_INTERPRET=1) against autograd through
group_norm_ref, under the house tolerance rule: dx, dweight and dbias on labelled odd shapes, every
dtype, with and without SiLU, weight/bias None, channels-last (4-D and 5-D), dy of other strides,
both plans of the kernels, determinism, double backward, the custom ops (opcheck) and a
torch.compile(fullgraph=True) training step. A spy on the backward launcher proves the fused
backward ran. Without CUDA or TRITON_INTERPRET=1 the fused tests skip (the fused backend would run
the reference: ref against ref is no test of the kernels); the dispatch tests run everywhere."""

from __future__ import annotations

import sys

import pytest
import torch
from support.spy import record_calls
from support.tolerance import assert_within_ref_error

from fusediff import kernels as K

GN = sys.modules["fusediff.kernels.group_norm"]  # the module; K.group_norm is the function

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or GN._interpreting()) or not GN._have_triton(),
    reason="the Triton kernels run on CUDA, or on CPU tensors under TRITON_INTERPRET=1")
CASES = [  # (shape, num_groups)
    ((2, 32, 8, 8), 8),  # a UNet feature map, aligned
    ((2, 63, 21, 17), 7),  # non-aligned
    ((1, 6, 5, 3, 2), 3),  # three spatial dims (video, volume)
    ((3, 10), 5),  # no spatial dims
    ((3, 4, 1), 4),  # one element per group: x_hat = 0, only eps
    ((1, 12, 33), 1),  # a single group (LayerNorm over C and S)
    ((2, 12, 7), 12),  # a group per channel (InstanceNorm)
]
MEMORY_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def make_inputs(shape, dtype, seed, param_dtype=None):
    """x, weight, bias and an upstream gradient dy, on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.0 + 0.5
    w = 1.0 + 0.5 * torch.randn(shape[1], generator=g)
    b = 0.5 * torch.randn(shape[1], generator=g)
    dy = torch.randn(shape, generator=g)
    pd = param_dtype or dtype
    return x.to(DEVICE, dtype), w.to(DEVICE, pd), b.to(DEVICE, pd), dy.to(DEVICE, dtype)


def grads(fn, x, w, b, dy, wants=(True, True, True)):
    """(y, dx, dw, db) of fn(x, w, b) by autograd, given dy; None for a gradient not asked for."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(want) for t, want in zip((x, w, b), wants)]
    y = fn(*leaves)
    y.backward(dy)
    return (y, *(None if t is None else t.grad for t in leaves))


def check_grads(x, num_groups, w, b, dy, activation, what, wants=(True, True, True)):
    """The fused path's y, dx, dw, db against autograd through group_norm_ref at x's precision and in
    float64 (same values upcast), by the house rule; returns the fused (y, dx, dw, db)."""
    fn = lambda x, w, b: K.group_norm(x, num_groups, w, b, 1e-5, activation)  # noqa: E731
    ref = lambda x, w, b: K.group_norm_ref(x, num_groups, w, b, 1e-5, activation)  # noqa: E731
    with K.use_backend("fused"):
        got = grads(fn, x, w, b, dy, wants)
    with K.use_backend("ref"):
        lowp = grads(ref, x, w, b, dy, wants)
        up = lambda t: None if t is None else t.double()  # noqa: E731
        hi = grads(ref, up(x), up(w), up(b), dy.double(), wants)
    for name, g, lo, h in zip(("y", "dx", "dweight", "dbias"), got, lowp, hi):
        assert (g is None) == (h is None), f"{what}: {name} is {g} on the fused path, {h} by the reference"
        if g is not None:
            assert g.dtype == lo.dtype and g.shape == h.shape, (name, g.dtype, lo.dtype, g.shape)
            assert_within_ref_error(g, lo, h, f"{what}: {name}")
    return got


@pytest.fixture
def backward_calls(monkeypatch):
    """The calls to the Triton backward launcher made during the test."""
    return record_calls(monkeypatch, GN._backward_kernels(), "launch_backward")


@needs_triton
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, num_groups", CASES, ids=[str(c) for c in CASES])
def test_gradients_match_reference_labelled_shapes(shape, num_groups, dtype, activation, backward_calls):
    x, w, b, dy = make_inputs(shape, dtype, seed=sum(shape))
    check_grads(x, num_groups, w, b, dy, activation, f"shape={shape} G={num_groups} {dtype} {activation}")
    assert len(backward_calls) == 1, "the fused backward did not run"


@needs_triton
@pytest.mark.parametrize("affine", ["weight", "bias", "none"])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_without_weight_or_bias(affine, activation, backward_calls):
    x, w, b, dy = make_inputs((2, 12, 9, 5), torch.float16, seed=3)
    w = w if affine == "weight" else None
    b = b if affine == "bias" else None
    check_grads(x, 3, w, b, dy, activation, f"affine={affine} {activation}")
    assert len(backward_calls) == 1


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, num_groups", [((2, 12, 5, 7), 3), ((2, 12, 3, 5, 4), 4)], ids=["NHWC", "NDHWC"])
def test_channels_last_gradients_keep_the_layout(shape, num_groups, dtype, backward_calls):
    x, w, b, dy = make_inputs(shape, dtype, seed=7)
    fmt = MEMORY_FORMATS[len(shape)]
    x = x.contiguous(memory_format=fmt)
    _, dx, _, _ = check_grads(x, num_groups, w, b, dy.contiguous(memory_format=fmt), "silu", f"{fmt} {dtype}")
    assert dx.is_contiguous(memory_format=fmt), dx.stride()
    check_grads(x, num_groups, w, b, dy, "silu", f"{fmt} x, contiguous dy {dtype}")
    assert len(backward_calls) == 2


@needs_triton
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_dy_of_other_strides(layout, backward_calls):
    x, w, b, _ = make_inputs((2, 8, 6, 5), torch.float32, seed=8)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(80)
    dys = {"every other column": torch.randn(2, 8, 6, 10, generator=g).to(DEVICE)[..., ::2],
           "transposed": torch.randn(2, 8, 5, 6, generator=g).to(DEVICE).transpose(2, 3),
           "expanded": torch.randn(1, 8, 1, 1, generator=g).to(DEVICE).expand(2, 8, 6, 5)}
    for name, dy in dys.items():
        check_grads(x, 4, w, b, dy, "silu", f"{layout} x, dy {name} {dy.stride()}")
    assert len(backward_calls) == len(dys)


@needs_triton
@pytest.mark.parametrize("wants", [(True, False, False), (False, True, True), (False, True, False)],
                         ids=["x only", "parameters only", "weight only"])
def test_only_some_inputs_require_grad(wants, backward_calls):
    x, w, b, dy = make_inputs((2, 12, 5, 3), torch.float32, seed=10)
    check_grads(x, 4, w, b, dy, "silu", f"requires_grad={wants}", wants)
    assert len(backward_calls) == 1


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_parameters_with_low_precision_x(dtype):
    x, w, b, dy = make_inputs((2, 12, 9, 7), dtype, seed=4, param_dtype=torch.float32)
    _, dx, dw, db = check_grads(x, 4, w, b, dy, "silu", f"{dtype} x, float32 weight and bias")
    assert (dx.dtype, dw.dtype, db.dtype) == (dtype, torch.float32, torch.float32)


PLANS = [  # (shape, num_groups, programs_per_sm with tiles of 64 or None): every plan the group fits
    ((2, 63, 21, 17), 7, None),  # non-aligned
    ((3, 6, 129, 7), 2, None),  # non-aligned positions
    ((1, 1280, 2, 2), 1, None),  # one group of many channels
    ((2, 12, 13, 11), 3, 64),  # small tiles: many ranges per channel, several merge and parameter steps
    ((2, 12, 13, 11), 3, 1),  # small tiles: one range of several tiles per channel, a partial last one
]


@needs_triton
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape, num_groups, small_tiles", PLANS, ids=[str(p) for p in PLANS])
def test_launcher_plans(shape, num_groups, small_tiles, layout, monkeypatch):
    """Both plans of launch_backward; with small tiles, many ranges per channel and several merge steps."""
    bw = GN._backward_kernels()
    if small_tiles:
        for name, value in (("TILE", 64), ("MERGE_TILE", 4), ("PROGRAMS_PER_SM", small_tiles), ("PARAM_BLOCK", 4)):
            monkeypatch.setattr(bw, name, value)
    x, w, b, dy = make_inputs(shape, torch.float32, seed=sum(shape))
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    _, mean, rstd = GN._kernels().launch(x, num_groups, w, b, 1e-5, True, layout == "nhwc", return_stats=True)
    _, dx_ref, dw_ref, db_ref = grads(lambda x, w, b: K.group_norm_ref(x, num_groups, w, b, 1e-5, "silu"), x, w, b, dy)
    _, *hi = grads(lambda x, w, b: K.group_norm_ref(x, num_groups, w, b, 1e-5, "silu"),
                   x.double(), w.double(), b.double(), dy.double())
    plans = ["split"] + (["one_pass"] if bw.fits_one_pass(x, num_groups) else [])
    for plan in plans:
        got = bw.launch_backward(dy, x, mean, rstd, w, b, num_groups, True, layout == "nhwc", force_plan=plan)
        for name, g, lo, h in zip(("dx", "dweight", "dbias"), got, (dx_ref, dw_ref, db_ref), hi):
            assert_within_ref_error(g, lo, h, f"{plan} {shape} {layout} small_tiles={small_tiles}: {name}")
        assert got[0].stride() == x.stride()


@needs_triton
@pytest.mark.parametrize("shape", [(2, 12, 5, 7), (1, 8, 40, 70)], ids=["one pass", "split"])
def test_backward_is_deterministic(shape):
    x, w, b, dy = make_inputs(shape, torch.float16, seed=12)
    fn = lambda x, w, b: K.group_norm(x, 4, w, b, activation="silu")  # noqa: E731
    with K.use_backend("fused"):
        first, second = grads(fn, x, w, b, dy), grads(fn, x, w, b, dy)
    for name, a, c in zip(("y", "dx", "dweight", "dbias"), first, second):
        assert torch.equal(a, c), f"{name} differs between two identical backward passes"


@needs_triton
def test_double_backward_raises():
    x, w, b, _ = make_inputs((2, 8, 3, 3), torch.float32, seed=13)
    x.requires_grad_()
    with K.use_backend("fused"):
        y = K.group_norm(x, 4, w, b, activation="silu")
        (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="(?i)once_differentiable|double backward"):
            dx.sum().backward()


@needs_triton
def test_custom_ops_pass_opcheck():
    x, w, b, dy = make_inputs((2, 8, 6, 5), torch.float32, seed=14)
    y, mean, rstd = torch.ops.fusediff.group_norm_fwd(x, 4, w, b, 1e-5, True)
    torch.testing.assert_close(y, K.group_norm_ref(x, 4, w, b, 1e-5, "silu"))
    xg = x.reshape(2, 4, -1).double()
    torch.testing.assert_close(mean, xg.mean(-1).float())
    torch.testing.assert_close(rstd, torch.rsqrt(xg.var(-1, unbiased=False) + 1e-5).float())
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    torch.library.opcheck(torch.ops.fusediff.group_norm_fwd, (x.clone().requires_grad_(), 4, wg, bg, 1e-5, True))
    torch.library.opcheck(torch.ops.fusediff.group_norm_bwd, (dy, x, mean, rstd, w, None, 4, False))
    with pytest.raises(ValueError, match="contiguous or channels-last"):
        torch.ops.fusediff.group_norm_bwd(dy, x.transpose(2, 3), mean, rstd, w, b, 4, True)


@needs_triton
def test_compiled_training_step_fullgraph(backward_calls):
    x, w, b, dy = make_inputs((2, 6, 5, 7), torch.float32, seed=11)
    x = x.contiguous(memory_format=torch.channels_last)

    def step(x, w, b):
        return K.group_norm(x, 3, w, b, 1e-5, "silu")

    torch._dynamo.reset()
    with K.use_backend("fused"):
        got = grads(torch.compile(step, backend="aot_eager", fullgraph=True), x, w, b, dy)
        assert len(backward_calls) == 1, "the compiled step did not run the fused backward"
        eager = grads(step, x, w, b, dy)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for name, a, c in zip(("y", "dx", "dweight", "dbias"), got, eager):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"compiled {n}: {m}")


# --- dispatch (every run) ------------------------------------------------------------------------


@pytest.mark.parametrize("backend, dtype", [("ref", torch.float32), ("auto", torch.float32), ("fused", torch.float64)],
                         ids=["ref backend", "auto on CPU", "float64"])
def test_reference_backward_where_the_fused_path_does_not_apply(backend, dtype, monkeypatch):
    calls = record_calls(monkeypatch, GN, "_backward_kernels")
    x, w, b, dy = make_inputs((2, 8, 4, 4), dtype, seed=15)
    if DEVICE == "cuda" and backend == "auto":
        pytest.skip("auto runs the fused path on CUDA")
    fn = lambda x, w, b: K.group_norm(x, 4, w, b, activation="silu")  # noqa: E731
    with K.use_backend(backend):
        _, *got = grads(fn, x.cpu(), w.cpu(), b.cpu(), dy.cpu())
    _, *want = grads(lambda x, w, b: K.group_norm_ref(x, 4, w, b, activation="silu"), x.cpu(), w.cpu(), b.cpu(),
                     dy.cpu())
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    assert not calls, "the Triton backward ran where the reference should"
