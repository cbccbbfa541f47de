"""timestep_embedding's and timestep_mlp's Triton kernels on a CUDA device: the widths and batches
of diffusion UNets, every timestep and weight dtype, outputs poisoned with NaN, the house
tolerance rule against float64; diffusers' exact values from the embedding kernel (it repeats
PyTorch's CUDA float32 operations); one kernel launch per call (two for the MLP's two-launch
plan), counted by the profiler; torch.compile and CUDA graphs; and the UNet's time embedding on
the fused path against the module path. Every test here is marked gpu and skips without CUDA."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from support.tolerance import assert_within_ref_error

from fusediff import UNet2DModel
from fusediff import kernels as K

TE = sys.modules["fusediff.kernels.timestep_embedding"]
TM = sys.modules["fusediff.kernels.timestep_mlp"]
pytestmark = pytest.mark.gpu
TIMESTEP_DTYPES = [torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64]
BATCHES = [1, 2, 16, 1000]
DIMS = [128, 320, 321, 1280]
OPTIONS = {"sd": (True, 0.0, 1.0, 10000), "ddpm": (False, 1.0, 1.0, 10000), "scaled": (True, 1.0, 1000.0, 10000)}
WEIGHT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MLP_SHAPES = [  # (dim, hidden, out_features)
    (320, 1280, 1280),  # Stable Diffusion
    (128, 512, 512),  # DDPM CIFAR-10
    (321, 1000, 777),  # odd everything
]


def timesteps(n, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.rand(n, generator=g, device="cuda", dtype=torch.float64) * 999).to(dtype)
    return torch.randint(0, 1000, (n,), generator=g, device="cuda").to(dtype)


def embedding_fp64(t, dim, flip, shift, scale, max_period):
    half = dim // 2
    omega = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=t.device) / (half - shift))
    a = scale * (t.double()[:, None] * omega[None, :])
    parts = [a.cos(), a.sin()] if flip else [a.sin(), a.cos()]
    return torch.cat(parts + [a.new_zeros(t.shape[0], dim % 2)], dim=-1)


def mlp_fp64(t, dim, flip, shift, scale, max_period, w1, b1, w2, b2):
    emb = embedding_fp64(t, dim, flip, shift, scale, max_period).to(w1.dtype).double()  # the UNet's cast
    up = lambda p: None if p is None else p.double()  # noqa: E731
    return F.linear(F.silu(F.linear(emb, up(w1), up(b1))), up(w2), up(b2))


def mlp_weights(dim, hidden, out_features, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w1 = torch.randn(hidden, dim, generator=g, device="cuda") / math.sqrt(dim)
    w2 = torch.randn(out_features, hidden, generator=g, device="cuda") / math.sqrt(hidden)
    b1, b2 = (0.1 * torch.randn(k, generator=g, device="cuda") for k in (hidden, out_features))
    return tuple(p.to(dtype) for p in (w1, b1, w2, b2))


def kernel_launches(fn) -> int:
    """Number of CUDA kernels one call of ``fn`` runs (after a warm-up call that compiles)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


# --- the embedding ---------------------------------------------------------------------------

@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("n", BATCHES)
def test_embedding_every_dtype(n, dim, options):
    args = (dim, *OPTIONS[options])
    for dtype in TIMESTEP_DTYPES:
        t = timesteps(n, dtype, seed=n + dim)
        out = torch.full((n, dim), float("nan"), device="cuda")
        got = TE._kernels().launch(t, *args, out=out)
        assert_within_ref_error(got, TE._ref(t, *args), embedding_fp64(t, *args), f"N={n} dim={dim} {dtype} {options}")


@pytest.mark.parametrize("dim", DIMS + [1, 3, 33])
@pytest.mark.parametrize("dtype", [torch.int64, torch.float32], ids=str)
def test_embedding_gives_diffusers_values_exactly(dtype, dim):
    # reciprocal of half - shift as ATen divides by a CPU scalar, libdevice exp/sin/cos without FTZ
    t = timesteps(64, dtype, seed=dim)
    for name, options in OPTIONS.items():
        if dim // 2 == options[1]:
            continue  # refused by validation
        got = K.timestep_embedding(t, dim, *options)
        expect = get_timestep_embedding(t, dim, *options)
        differ = (got != expect).sum().item()
        assert differ == 0, (f"dim={dim} {dtype} {name}: {differ} of {got.numel()} values differ from diffusers, "
                             f"max {(got - expect).abs().max().item():.3e}")


def test_embedding_is_one_launch_and_compiles():
    t = timesteps(16, torch.int64, seed=1)
    assert kernel_launches(lambda: K.timestep_embedding(t, 320, True, 0.0)) == 1
    compiled = torch.compile(lambda t: K.timestep_embedding(t, 321, True, 0.0), fullgraph=True)
    args = (321, True, 0.0, 1.0, 10000)
    assert_within_ref_error(compiled(t), TE._ref(t, *args), embedding_fp64(t, *args), "torch.compile")


# --- the time MLP ----------------------------------------------------------------------------

@pytest.mark.parametrize("plan", ["auto", "one", "two"])
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", MLP_SHAPES, ids=[str(s) for s in MLP_SHAPES])
def test_mlp_shapes(shape, dtype, plan):
    dim, hidden, out_features = shape
    w = mlp_weights(dim, hidden, out_features, dtype, seed=dim)
    for n in BATCHES:
        for name in ("sd", "ddpm"):
            args = (timesteps(n, torch.int64, seed=n), dim, *OPTIONS[name], *w)
            out = torch.full((n, out_features), float("nan"), dtype=dtype, device="cuda")
            got = TM._kernels().launch(*args, plan=plan, out=out)
            assert_within_ref_error(got, TM._ref(*args), mlp_fp64(*args), f"{shape} N={n} {dtype} {plan} {name}")


@pytest.mark.parametrize("plan, launches", [("one", 1), ("two", 2)])
def test_mlp_launch_count(plan, launches):
    args = (timesteps(2, torch.int64, seed=2), 320, *OPTIONS["sd"], *mlp_weights(320, 1280, 1280, torch.float16, 2))
    assert kernel_launches(lambda: TM._kernels().launch(*args, plan=plan)) == launches


def test_mlp_compile_and_cuda_graph():
    w = mlp_weights(128, 512, 512, torch.float16, seed=3)
    t = timesteps(16, torch.int64, seed=3)
    args = (t, 128, *OPTIONS["ddpm"], *w)
    compiled = torch.compile(lambda t: K.timestep_mlp(t, 128, *OPTIONS["ddpm"], *w), fullgraph=True)
    assert_within_ref_error(compiled(t), TM._ref(*args), mlp_fp64(*args), "torch.compile")
    static_t = t.clone()
    K.timestep_mlp(static_t, 128, *OPTIONS["ddpm"], *w)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = K.timestep_mlp(static_t, 128, *OPTIONS["ddpm"], *w)
    static_t.copy_(t.flip(0))
    graph.replay()
    torch.testing.assert_close(static_out, K.timestep_mlp(t.flip(0), 128, *OPTIONS["ddpm"], *w), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=str)
def test_unet_time_embedding_fused_against_module_path(dtype):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, block_out_channels=(64, 128), norm_num_groups=32, layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).to("cuda", dtype)
    t = timesteps(2, torch.int64, seed=4)
    lin = unet.time_embedding
    with torch.no_grad():
        with K.use_backend("ref"):
            ref = unet._time_embedding(t)
        fused = unet._time_embedding(t)
        assert kernel_launches(lambda: unet._time_embedding(t)) <= 2
    hi = mlp_fp64(t, 64, True, 0, 1, 10000, lin.linear_1.weight, lin.linear_1.bias, lin.linear_2.weight,
                  lin.linear_2.bias)
    assert_within_ref_error(fused, ref, hi, f"UNet time embedding {dtype}")
