"""Channels-last end to end on a CUDA device: one SD-like UNet step and one VAE decode in fp16 run no
layout-conversion kernel.

The models are SD-like at SD 1.x's real widths (see test_compile_cuda.py), moved to channels-last with
channels-last inputs, on the fused kernels. One call of each runs under torch.profiler;
bench/profile_step.py's summary names the layout copies: cuDNN's and cuBLAS's conversion kernels
(nchwToNhwc, nhwcToNchw, transpose) and the kernels of any ``aten::copy_`` between two memory orders
of one shape. There must be none; the top kernels by time are printed either way. The output must
be channels-last and agree with the fp64 model under the house tolerance rule.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fusediff import AutoencoderKL, UNet2DConditionModel
from fusediff import kernels as K
from support.configs import SD_LIKE_UNET, SD_LIKE_VAE
from support.tolerance import assert_within_ref_error

pytestmark = pytest.mark.gpu

UNET, VAE = SD_LIKE_UNET, SD_LIKE_VAE
CL = torch.channels_last


def profile_step():
    """bench/profile_step.py, imported only here (it needs a GPU)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import profile_step

    return profile_step


def check_no_layout_copies(fn, args_hi, args_low, to_lowp, what):
    ps = profile_step()
    with torch.no_grad():
        hi = fn(*args_hi)
        to_lowp()
        with K.use_backend("ref"):
            ref = fn(*args_low)
        summary = ps.profile_call(lambda: fn(*args_low))
        got = fn(*args_low)
    print(ps.markdown({what: summary}, "channels-last, fp16"))
    assert not summary["copies"], f"{what}: layout copies {summary['copies']}"
    assert got.is_contiguous(memory_format=CL), f"{what}: output strides {got.stride()}"
    assert_within_ref_error(got, ref, hi, f"{what}, channels-last")


def test_unet_step_has_no_layout_copies():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET).to("cuda").eval().double()
    x = torch.randn(2, 4, 32, 32, device="cuda", dtype=torch.float64)
    t = torch.tensor([999, 10], device="cuda")
    cond = torch.randn(2, 77, 768, device="cuda", dtype=torch.float64)
    check_no_layout_copies(lambda x, c: unet(x, t, c).sample, (x, cond),
                           (x.half().contiguous(memory_format=CL), cond.half()),
                           lambda: unet.half().to(memory_format=CL), "UNet2DConditionModel step")


def test_vae_decode_has_no_layout_copies():
    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE).to("cuda").eval().double()
    z = torch.randn(1, 4, 32, 32, device="cuda", dtype=torch.float64)
    check_no_layout_copies(lambda z: vae.decode(z).sample, (z,), (z.half().contiguous(memory_format=CL),),
                           lambda: vae.half().to(memory_format=CL), "AutoencoderKL.decode")
