"""group_norm's Triton kernels on a CUDA device: the feature maps of diffusion UNets in every
dtype and both layouts, random odd shapes, outputs poisoned with NaN (every element must be
written), the house tolerance rule (NaN never passes), torch.compile, and the UNet on the fused
path against the reference path. Every test here is marked gpu and skips without CUDA."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from support.gpu_tiers import examples
from support.tolerance import assert_within_ref_error

from fusediff import UNet2DModel
from fusediff import kernels as K

GN = sys.modules["fusediff.kernels.group_norm"]
pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [  # (shape, num_groups)
    ((2, 320, 64, 64), 32),  # SD UNet, first level
    ((2, 640, 32, 32), 32),
    ((2, 1280, 16, 16), 32),
    ((1, 512, 128, 128), 32),  # SD VAE decoder
    ((1, 256, 256, 256), 32),
    ((1, 128, 512, 512), 32),
    ((2, 960, 24, 40), 32),  # non-square, 30 channels per group
    ((3, 63, 33, 17), 7),  # non-aligned everything
]
MEMORY_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def inputs(shape, dtype, seed, channels_last=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(shape, generator=g, device="cuda") * 2 + 0.3).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=MEMORY_FORMATS[len(shape)])
    w = (1 + 0.5 * torch.randn(shape[1], generator=g, device="cuda")).to(dtype)
    b = (0.5 * torch.randn(shape[1], generator=g, device="cuda")).to(dtype)
    return x, w, b


def check(x, num_groups, w, b, activation, what, plan=None):
    out = torch.full_like(x, float("nan"))  # poisoned: a missed element stays NaN
    got = GN._kernels().launch(x, num_groups, w, b, 1e-5, activation == "silu", bool(GN._channels_last(x)), out=out,
                               force_plan=plan)
    assert got.stride() == x.stride()
    silu = F.silu if activation == "silu" else (lambda t: t)
    lowp = silu(F.group_norm(x, num_groups, w, b, 1e-5))
    hi = silu(F.group_norm(x.double(), num_groups, w.double(), b.double(), 1e-5))
    assert_within_ref_error(got, lowp, hi, what)


@pytest.mark.parametrize("plan", [None, "split"], ids=["auto plan", "split plan"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, num_groups", SHAPES, ids=[str(s) for s, _ in SHAPES])
def test_unet_shapes(shape, num_groups, dtype, channels_last, plan):
    if plan == "split" and GN._kernels().plan(torch.empty(shape, device="meta"), num_groups) == "split":
        pytest.skip("the auto plan is already split for this shape")
    x, w, b = inputs(shape, dtype, seed=sum(shape), channels_last=channels_last)
    check(x, num_groups, w, b, "silu", f"{shape} G={num_groups} {dtype} channels_last={channels_last} {plan}", plan)


@settings(max_examples=examples(40))
@given(batch=st.integers(1, 3), groups=st.integers(1, 33), per_group=st.integers(1, 17),
       spatial=st.lists(st.integers(1, 70), min_size=0, max_size=3), dtype=st.sampled_from(DTYPES),
       channels_last=st.booleans(), activation=st.sampled_from([None, "silu"]), seed=st.integers(0, 2**31 - 1),
       split=st.booleans())
def test_random_shapes(batch, groups, per_group, spatial, dtype, channels_last, activation, seed, split):
    shape = (batch, groups * per_group, *spatial)
    assume(per_group * torch.Size(spatial).numel() > 1)  # torch refuses one value per group
    assume(torch.Size(shape).numel() <= 1 << 22)
    x, w, b = inputs(shape, dtype, seed, channels_last=channels_last and len(shape) in MEMORY_FORMATS)
    check(x, groups, w, b, activation, f"{shape} G={groups} {dtype} cl={channels_last} {activation} seed={seed} "
          f"split={split}", "split" if split else None)


def test_public_function_under_torch_compile():
    x, w, b = inputs((2, 64, 24, 24), torch.float16, seed=1, channels_last=True)
    compiled = torch.compile(lambda x: K.group_norm(x, 8, w, b, activation="silu"), fullgraph=True)
    got = compiled(x)
    assert got.is_contiguous(memory_format=torch.channels_last)
    hi = F.silu(F.group_norm(x.double(), 8, w.double(), b.double()))
    assert_within_ref_error(got, F.silu(F.group_norm(x, 8, w, b)), hi, "torch.compile")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_unet_fused_path_agrees_with_reference_path(dtype):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(64, 128), norm_num_groups=32,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).to("cuda")
    x = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.no_grad():
        hi = unet.double()(x.double(), 10).sample
        low = unet.to(dtype)
        with K.use_backend("ref"):
            ref = low(x.to(dtype), 10).sample
        with K.use_backend("auto"):
            fused = low(x.to(dtype), 10).sample
    assert_within_ref_error(fused, ref, hi, f"UNet {dtype}, fused against reference path")
