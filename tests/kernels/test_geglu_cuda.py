"""geglu's Triton kernel on a CUDA device: the feed-forward widths of Stable Diffusion's UNet and
other channel counts, odd sizes, float16/bfloat16/float32 and both GELU forms, outputs poisoned with
NaN, under the house tolerance rule against float64; the reference's exact values for the erf form
(the kernel repeats ATen's float32 operations with libdevice's erf); one kernel launch per call,
counted by the profiler; strided inputs; torch.compile (Inductor) and CUDA graphs; and the
feed-forward module on the fused path against the reference path. Every test here is marked gpu
and skips without CUDA."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from support.tolerance import assert_within_ref_error

from fusediff import kernels as K
from fusediff.models.feed_forward import FeedForward

GG = sys.modules["fusediff.kernels.geglu"]
pytestmark = pytest.mark.gpu
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
APPROXIMATE = ["none", "tanh"]
SD_SHAPES = [  # (B, tokens, 2F): SD1.5 at 64x64 latents, batch 2, F = 4 * channels
    (2, 4096, 2 * 1280),  # 64x64 tokens, 320 channels
    (2, 1024, 2 * 2560),  # 32x32 tokens, 640 channels
    (2, 256, 2 * 5120),  # 16x16 tokens, 1280 channels
    (2, 64, 2 * 5120),  # 8x8 tokens (mid block), 1280 channels
]
OTHER_SHAPES = [
    (2, 77, 2 * 1536),  # 384 channels (F = 6 column blocks)
    (4, 256, 2 * 3072),  # 768 channels
    (1, 1, 2 * 1280),  # one token
    (3, 77, 2 * 37),  # non-aligned
    (5, 333, 2 * 1001),  # odd rows and width
    (1, 2),  # F = 1
    (2 * 4099,),  # 1-D, one odd row
    (7, 3, 5, 2 * 255),  # 4-D, one short of a column block
]


def make_x(shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(shape, generator=g, device="cuda", dtype=torch.float32) * 2.5).to(dtype)


def geglu_fp64(x, approximate="none"):
    """h * GELU(gate) in float64 from the formula: what results are measured against."""
    h, g = x.double().chunk(2, dim=-1)
    if approximate == "tanh":
        act = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
    else:
        act = 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))
    return h * act


def kernel_launches(fn) -> int:
    """Number of CUDA kernels one call of ``fn`` runs (after a warm-up call that compiles)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@pytest.mark.parametrize("approximate", APPROXIMATE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SD_SHAPES + OTHER_SHAPES, ids=str)
def test_kernel_within_rule(shape, dtype, approximate):
    x = make_x(shape, dtype, seed=sum(shape))
    out = torch.full((*shape[:-1], shape[-1] // 2), float("nan"), dtype=dtype, device="cuda")
    got = GG._kernels().launch(x, approximate, out=out)  # a missed element stays NaN
    assert got is out
    assert_within_ref_error(got, GG._ref(x, approximate), geglu_fp64(x, approximate),
                            f"{shape} {dtype} {approximate}")


@pytest.mark.parametrize("layout", ["every other row", "padded rows", "transposed leading dims", "strided last dim"])
def test_strided_inputs(layout):
    base = make_x((4, 300, 2 * 640 + 16), torch.float16, seed=3)
    x = {"every other row": base[:, ::2, : 2 * 640], "padded rows": base[..., 8 : 8 + 2 * 640],
         "transposed leading dims": base[..., : 2 * 640].transpose(0, 1),
         "strided last dim": base[..., : 2 * 640][..., ::2]}[layout]  # the reference
    got = K.geglu(x)
    assert got.is_contiguous() and got.shape == (*x.shape[:-1], x.shape[-1] // 2)
    assert_within_ref_error(got, GG._ref(x, "none"), geglu_fp64(x), layout)


def test_one_launch_per_call():
    x = make_x(SD_SHAPES[0], torch.float16, seed=4)
    assert kernel_launches(lambda: K.geglu(x)) == 1
    assert kernel_launches(lambda: K.geglu(x, approximate="tanh")) == 1


def test_compile_and_cuda_graph():
    x = make_x(SD_SHAPES[1], torch.float16, seed=5)
    compiled = torch.compile(lambda x: K.geglu(x), fullgraph=True)
    assert_within_ref_error(compiled(x), GG._ref(x, "none"), geglu_fp64(x), "torch.compile")
    static_x = x.clone()
    K.geglu(static_x)  # compile the kernel before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = K.geglu(static_x)
    static_x.copy_(x.flip(0))
    graph.replay()
    torch.testing.assert_close(static_out, K.geglu(x.flip(0)), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_feed_forward_fused_against_reference_path(dtype):
    torch.manual_seed(0)
    ff = FeedForward(320, mult=4).to("cuda", dtype)
    x = torch.randn(2, 1024, 320, device="cuda").to(dtype)
    with torch.no_grad():
        fused = ff(x)
        with K.use_backend("ref"):
            ref = ff(x)
        proj = ff.net[0].proj
        hidden = torch.nn.functional.linear(x, proj.weight, proj.bias)  # the projection, as the module computes it
        hi = torch.nn.functional.linear(geglu_fp64(hidden), ff.net[2].weight.double(), ff.net[2].bias.double())
    assert_within_ref_error(fused, ref, hi, f"feed-forward {dtype}")
