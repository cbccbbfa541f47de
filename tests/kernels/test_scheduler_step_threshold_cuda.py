"""The fused scheduler step's noise scale (``variance=``) and dynamic thresholding (``threshold=``) on
the GPU: the select and step kernels against scheduler_step_ref for every dtype, batch-strided views,
odd and large items (3x256x256, B up to 8), ties, NaN items and ratio 1; no host synchronisation;
CUDA-graph capture replayed with new inputs and coefficients; opcheck and inductor. Every test here
is marked gpu and skips without CUDA."""

from __future__ import annotations

import random

import pytest
import torch
from support.cuda_graphs import warm_and_capture
from support.cuda_sync import no_sync
from support.tolerance import assert_within_ref_error

from fusediff import kernels as K
from fusediff.kernels import scheduler_step_coeffs as SC

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [
    (2, 3, 64, 64),  # IF stage I
    (8, 3, 256, 256),  # IF stage II, the largest items
    (3, 5, 7, 9),  # odd: inner not a multiple of 8 (scalar path)
    (1, 3, 64, 65),  # one item, odd inner
    (4, 1),  # one element per item
    (5, 3, 1000),  # 1-D signals, inner a multiple of 8
]


def rand(shape, dtype, g, scale=1.5):
    return (torch.randn(shape, generator=g, device="cuda") * scale).to(dtype)


def halves(shape, dtype, g):
    """(model output, variance): the halves of a (B, 2C, ...) tensor split along dim 1."""
    v = torch.rand(shape, generator=g, device="cuda").mul(2).sub(1)
    both = torch.cat([rand(shape, torch.float32, g), v], dim=1).to(dtype)
    return both[:, : shape[1]], both[:, shape[1]:]


def coeffs_for(seed, threshold=True):
    r = random.Random(seed)
    u = lambda: r.uniform(-2.0, 2.0)  # noqa: E731
    return SC.StepCoeffs(p_x=u(), p_m=u(), p_n=u(), c_x=u(), c_m=u(), c_n=u(), c_x0=u(),
                         clip=0.0 if threshold else r.uniform(0.2, 2.0), v_a=r.uniform(-3.0, 0.0),
                         v_b=r.uniform(-1.0, 1.0))


def check(x, m, c, *, noise, variance, threshold, what):
    kw = dict(noise=noise, variance=variance, threshold=threshold, return_pred=True)
    with K.use_backend("fused"):
        prev, pred = K.scheduler_step(x, m, c, **kw)
    ref_prev, ref_pred = K.scheduler_step_ref(x, m, c, **kw)
    up = lambda t: None if t is None else t.double()  # noqa: E731
    hi_prev, hi_pred = K.scheduler_step_ref(up(x), up(m), c, noise=up(noise), variance=up(variance),
                                            threshold=threshold, return_pred=True)
    assert_within_ref_error(prev, ref_prev, hi_prev, what + " prev_sample")
    assert_within_ref_error(pred, ref_pred, hi_pred, what + " x0")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", ["variance", "threshold", "both-strided", "ratio1-dense"])
def test_cuda_matches_ref(shape, dtype, case):
    g = torch.Generator(device="cuda").manual_seed(shape[0])
    x, n = rand(shape, dtype, g), rand(shape, dtype, g)
    m, v = halves(shape, dtype, g)
    if case == "ratio1-dense":
        m, v = m.contiguous(), v.contiguous()
    thresholded = case != "variance"
    threshold = (1.0, 2.0) if case == "ratio1-dense" else ((0.995, 1.5) if thresholded else None)
    check(x, m, coeffs_for(shape[0], thresholded), noise=n, variance=None if case == "threshold" else v,
          threshold=threshold, what=f"{shape} {dtype} {case}")


def x0_is_m(m):
    return torch.zeros_like(m), m, SC.StepCoeffs(p_m=1.0, c_x0=1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ratio", [0.995, 1.0, 0.5, 1e-6])
@pytest.mark.parametrize("values", ["normal", "ties", "constant", "small"])
def test_select_is_bit_exact(dtype, ratio, values):
    """With x0 = m the thresholded x0 equals torch's quantile-based reference exactly (both lerp with one
    fused multiply-add on CUDA), with ties, a constant item and items whose s clamps to 1."""
    g = torch.Generator(device="cuda").manual_seed(1)
    shape = (6, 3, 33, 41)
    m = {"normal": rand(shape, dtype, g, 2.0),
         "ties": (torch.randint(-4, 5, shape, generator=g, device="cuda") * 0.75).to(dtype),
         "constant": torch.full(shape, 1.25, device="cuda", dtype=dtype),
         "small": rand(shape, dtype, g, 0.1)}[values]
    x, m, c = x0_is_m(m)
    with K.use_backend("fused"):
        _, fused = K.scheduler_step(x, m, c, threshold=(ratio, 1.8), return_pred=True)
    expect = K.dynamic_threshold_ref(m, ratio, 1.8)
    assert torch.equal(fused, expect), f"max diff {(fused.float() - expect.float()).abs().max()}"


def test_nan_item_gives_nan_and_leaves_the_others():
    g = torch.Generator(device="cuda").manual_seed(2)
    m = rand((3, 3, 16, 16), torch.float16, g)
    m[1, 2, 3, 4] = float("nan")
    x, m, c = x0_is_m(m)
    with K.use_backend("fused"):
        _, got = K.scheduler_step(x, m, c, threshold=(0.9, 2.0), return_pred=True)
    assert torch.isnan(got[1]).all() and not torch.isnan(got[0]).any() and not torch.isnan(got[2]).any()
    torch.testing.assert_close(got, K.dynamic_threshold_ref(m, 0.9, 2.0), rtol=0, atol=0, equal_nan=True)


def test_no_host_sync_and_device_coefficients():
    g = torch.Generator(device="cuda").manual_seed(3)
    shape = (4, 3, 64, 64)
    x, n = rand(shape, torch.float16, g), rand(shape, torch.float16, g)
    m, v = halves(shape, torch.float16, g)
    c = coeffs_for(3)
    dev = c.to_tensor("cuda")
    expect = K.scheduler_step_ref(x, m, c, noise=n, variance=v, threshold=(0.95, 1.5), return_pred=True)
    with no_sync():
        a = K.scheduler_step(x, m, dev, noise=n, variance=v, threshold=(0.95, 1.5), return_pred=True)
        b = K.scheduler_step(x, m, c, noise=n, variance=v, threshold=(0.95, 1.5), return_pred=True)
    for got, ref in zip(a, expect):
        torch.testing.assert_close(got, ref, rtol=0, atol=4e-3)
    for got, other in zip(a, b):
        assert torch.equal(got, other)


def test_cuda_graph_replays_with_new_inputs_and_coefficients():
    """Capture an IF-like 3-step loop (learned-range noise scale and thresholding, model output halves
    as views); refill the inputs and the device coefficient table between replays."""
    shape = (2, 3, 64, 64)
    x0 = torch.empty(shape, device="cuda", dtype=torch.float16)
    both = torch.empty(3, shape[0], 2 * shape[1], *shape[2:], device="cuda", dtype=torch.float16)
    noise = torch.empty(3, *shape, device="cuda", dtype=torch.float16)
    table = torch.zeros(3, SC.NUM_COEFFS, device="cuda")
    state = torch.empty_like(x0)
    preds = torch.empty(3, *shape, device="cuda", dtype=torch.float16)

    def loop():
        for i in range(3):
            m, v = both[i].split(shape[1], dim=1)
            _, p = K.scheduler_step(state, m, table[i], noise=noise[i], variance=v, threshold=(0.95, 1.5),
                                    return_pred=True, out=state)
            preds[i].copy_(p)

    def fill(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x0.copy_(rand(shape, torch.float16, g))
        both.copy_(torch.cat([rand((3, *shape), torch.float16, g, 2.0),
                              torch.rand((3, *shape), generator=g, device="cuda").mul(2).sub(1).half()], dim=2))
        noise.copy_(rand((3, *shape), torch.float16, g, 1.0))
        abar = sorted(rng.uniform(0.05, 0.95) for rng in [random.Random(seed)] for _ in range(4))
        rows = []
        for i in range(3):
            v_a, v_b = SC.ddpm_learned_range(abar[i], abar[i + 1])
            rows.append(SC.ddpm(abar[i], abar[i + 1])._replace(c_n=1.0, v_a=v_a, v_b=v_b))
        table.copy_(torch.stack([r.to_tensor("cuda") for r in rows]))
        state.copy_(x0)
        return rows

    fill(0)
    graph = warm_and_capture(loop)
    for seed in (1, 2):
        rows = fill(seed)
        graph.replay()
        expect = x0.clone()
        for i, r in enumerate(rows):
            m, v = both[i].split(shape[1], dim=1)
            expect, pred = K.scheduler_step_ref(expect, m, r, noise=noise[i], variance=v, threshold=(0.95, 1.5),
                                                return_pred=True)
            torch.testing.assert_close(preds[i], pred, rtol=0, atol=4e-3, msg=f"seed {seed} step {i} x0")
        torch.cuda.synchronize()
        torch.testing.assert_close(state, expect, rtol=0, atol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_cuda(dtype):
    g = torch.Generator(device="cuda").manual_seed(4)
    shape = (2, 3, 40)
    x, n = rand(shape, dtype, g), rand(shape, dtype, g)
    m, v = halves(shape, dtype, g)
    op = torch.ops.fusediff.scheduler_step.default
    for c in (coeffs_for(4).to_tensor("cuda"), coeffs_for(4).to_tensor()):
        torch.library.opcheck(op, (x, m, c, n, [], True, v, 0.9, 1.5))
        torch.library.opcheck(op, (x, m.contiguous(), c, n, [n], False, None, 0.995, 1.0))


def test_inductor_compile_matches_eager():
    g = torch.Generator(device="cuda").manual_seed(5)
    shape = (2, 3, 64, 64)
    x, n = rand(shape, torch.float16, g), rand(shape, torch.float16, g)
    both = torch.cat([rand(shape, torch.float16, g), rand(shape, torch.float16, g, 0.5)], dim=1)
    c = coeffs_for(5).to_tensor("cuda")

    def step(x, both, n, c):
        m, v = both.split(shape[1], dim=1)
        return K.scheduler_step(x, m, c, noise=n, variance=v, threshold=(0.95, 1.5), return_pred=True)

    eager = step(x, both, n, c)
    compiled = torch.compile(step, fullgraph=True)(x, both, n, c)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
