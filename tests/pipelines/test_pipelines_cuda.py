"""Pipelines on a CUDA device: a CPU generator gives the CPU run's images; low precision runs."""

from __future__ import annotations

import pytest
import torch

from fusediff import DDIMPipeline, DDPMPipeline, DDPMScheduler, UNet2DModel

pytestmark = pytest.mark.gpu

UNET = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8, attention_head_dim=8)


def _pipe(cls):
    torch.manual_seed(0)
    pipe = cls(unet=UNet2DModel(**UNET), scheduler=DDPMScheduler(num_train_timesteps=100))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("cls, kwargs", [(DDPMPipeline, {}), (DDIMPipeline, {"eta": 1.0})])
def test_cuda_matches_cpu_with_a_cpu_generator(cls, kwargs):
    pipe = _pipe(cls)
    cpu = pipe(batch_size=3, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
               output_type="pt", **kwargs).images
    gpu = pipe.to("cuda")(batch_size=3, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                          output_type="pt", **kwargs).images
    assert gpu.is_cuda
    diff = (gpu.cpu() - cpu).abs().max().item()
    assert diff < 1e-3, f"max |cuda - cpu| = {diff}"  # TF32-free fp32; differences are rounding only


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_on_cuda(dtype):
    """A half-precision run on CUDA against the same run on the CPU.

    Not against a float32 run: DDIM draws x_T in the UNet's dtype, as diffusers does, and torch's CPU
    randn gives other numbers in float16 than in float32 (torch 2.11 on the GPU machine: up to 5.7
    apart for one seed), so a float32 run starts from other noise.
    """
    pipe = _pipe(DDIMPipeline).to(dtype)
    ref = pipe(batch_size=2, num_inference_steps=8, generator=torch.Generator().manual_seed(0), output_type="pt").images
    low = pipe.to("cuda")(batch_size=2, num_inference_steps=8, generator=torch.Generator().manual_seed(0),
                          output_type="pt").images
    assert low.dtype == dtype and low.is_cuda and torch.isfinite(low).all()
    diff = (low.float().cpu() - ref.float()).abs().max().item()
    assert diff < 0.05, f"max |{dtype} cuda - {dtype} cpu| = {diff}"
