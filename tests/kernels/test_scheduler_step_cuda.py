"""The fused scheduler step on the GPU: the CUDA kernel against scheduler_step_ref, with
vector and scalar (misaligned) paths, coefficients from device memory, no host
synchronisation, side streams, CUDA-graph replay with changing coefficients, opcheck and
torch.compile. Every test here is marked gpu and skips without CUDA."""

from __future__ import annotations

import random

import pytest
import torch
from support.spy import record_calls
from support.cuda_graphs import warm_and_capture
from support.tolerance import assert_within_ref_error

from fusediff import kernels as K
from fusediff.kernels import scheduler_step_coeffs as SC

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [
    (2, 4, 64, 64),  # an SD latent
    (2, 63, 21, 17),  # non-aligned
    (5,),  # shorter than one vector
    (1, 3, 64, 65),  # tail after the last whole vector
    (3, 1 << 20),  # many blocks
]


def rand(shape, dtype, g, offset=0):
    """Random values; with offset > 0 the tensor starts that many elements into its buffer,
    so its data pointer is not 16-byte aligned and the kernel takes the scalar path."""
    n = 1
    for s in shape:
        n *= s
    buf = torch.randn(n + offset, generator=g, device="cuda").to(dtype)
    return buf[offset:].view(shape)


def coeffs_for(seed, nh, clip):
    r = random.Random(seed)
    u = lambda: r.uniform(-2, 2)  # noqa: E731
    return SC.StepCoeffs(p_x=u(), p_m=u(), p_n=u(), c_x=u(), c_m=u(), c_n=u(), c_x0=u(),
                         clip=r.uniform(0.2, 2) if clip else 0.0, **{f"c_h{j}": u() for j in range(nh)})


@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("nh", range(SC.MAX_HISTORY + 1))
def test_cuda_matches_ref(shape, dtype, nh, misaligned):
    g = torch.Generator(device="cuda").manual_seed(nh)
    off = 1 if misaligned else 0
    x, m, n = (rand(shape, dtype, g, off) for _ in range(3))
    hist = [rand(shape, dtype, g, off) for _ in range(nh)]
    c = coeffs_for(nh, nh, clip=nh % 2 == 1)
    with K.use_backend("fused"):
        prev, pred = K.scheduler_step(x, m, c, noise=n, history=hist, return_pred=True)
    ref_prev, ref_pred = K.scheduler_step_ref(x, m, c, noise=n, history=hist, return_pred=True)
    up = lambda t: t.double()  # noqa: E731
    hi_prev, hi_pred = K.scheduler_step_ref(up(x), up(m), c, noise=up(n), history=[up(h) for h in hist],
                                            return_pred=True)
    what = f"{shape} {dtype} history={nh} misaligned={misaligned}"
    assert_within_ref_error(prev, ref_prev, hi_prev, what)
    assert_within_ref_error(pred, ref_pred, hi_pred, what + " x0")


def test_auto_backend_runs_the_kernel_on_cuda(monkeypatch):
    import fusediff.kernels.scheduler_step_ext as ext

    calls = record_calls(monkeypatch, ext, "launch")
    x = torch.randn(2, 4, 8, 8, device="cuda", dtype=torch.float16)
    with K.use_backend("auto"):
        K.scheduler_step(x, x.clone(), SC.ddim(0.4, 0.6))
    assert calls


def test_device_coefficients_and_no_host_sync():
    g = torch.Generator(device="cuda").manual_seed(0)
    x, m, n = (rand((2, 4, 64, 64), torch.float16, g) for _ in range(3))
    c = SC.ddpm(0.3, 0.5, noise_std=0.2, clip_sample_range=1.0)
    dev = c.to_tensor("cuda")
    expect = K.scheduler_step_ref(x, m, c, noise=n)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        a = K.scheduler_step(x, m, dev, noise=n)
        b = K.scheduler_step(x, m, c, noise=n)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(a, expect, rtol=0, atol=1e-3)
    torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_side_stream():
    x = torch.randn(4, 1 << 18, device="cuda")
    m = torch.randn_like(x)
    c = SC.ddim(0.2, 0.5)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = K.scheduler_step(x, m, c)
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(out, K.scheduler_step_ref(x, m, c))


def test_cuda_graph_replays_with_new_coefficients():
    """Capture a 3-step loop whose coefficients live in a device table; rewrite the table
    between replays and check each replay against the eager loop with those coefficients."""
    x0 = torch.randn(2, 4, 32, 32, device="cuda", dtype=torch.float16)
    m = torch.randn_like(x0)
    table = torch.zeros(3, SC.NUM_COEFFS, device="cuda")
    state = x0.clone()

    def loop():
        for i in range(3):
            K.scheduler_step(state, m, table[i], out=state)

    def fill(seed):
        alphas = sorted(rng.uniform(0.05, 0.95) for rng in [random.Random(seed)] for _ in range(4))
        rows = [SC.ddim(alphas[i], alphas[i + 1], prediction_type="v_prediction") for i in range(3)]
        table.copy_(torch.stack([r.to_tensor("cuda") for r in rows]))
        return rows

    fill(0)
    graph = warm_and_capture(loop)
    for seed in (1, 2):
        rows = fill(seed)
        state.copy_(x0)
        graph.replay()
        expect = x0
        for r in rows:
            expect = K.scheduler_step_ref(expect, m, r)
        torch.cuda.synchronize()
        torch.testing.assert_close(state, expect, rtol=0, atol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_cuda(dtype):
    x = torch.randn(2, 3, 40, device="cuda", dtype=dtype)
    hist = [torch.randn_like(x) for _ in range(2)]
    for c in (coeffs_for(3, 2, True).to_tensor("cuda"), coeffs_for(3, 2, True).to_tensor()):
        torch.library.opcheck(torch.ops.fusediff.scheduler_step.default, (x, torch.randn_like(x), c, None, hist, True))


def test_inductor_compile_matches_eager():
    x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16)
    m, h = torch.randn_like(x), torch.randn_like(x)
    c = SC.dpmpp_2m(1.0, 2.0, 3.0).to_tensor("cuda")

    def step(x, m, h, c):
        return K.scheduler_step(x, m, c, history=[h], return_pred=True)

    eager = step(x, m, h, c)
    compiled = torch.compile(step, fullgraph=True)(x, m, h, c)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cpu_coefficients_tensor_with_cuda_data_and_cuda_coeffs_with_cpu_data():
    x = torch.randn(64, device="cuda")
    c = SC.ddim(0.3, 0.6)
    torch.testing.assert_close(K.scheduler_step(x, x, c.to_tensor()), K.scheduler_step_ref(x, x, c))
    with pytest.raises(ValueError, match="coeffs is on cuda"):
        K.scheduler_step(x.cpu(), x.cpu(), c.to_tensor("cuda"))
