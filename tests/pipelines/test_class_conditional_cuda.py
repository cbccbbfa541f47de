"""ClassConditionalPipeline on a CUDA device: the loop never synchronises with the host (checked with
``torch.cuda.set_sync_debug_mode("error")``), CUDA-graph replay equals the eager loop when labels,
seeds, guidance scale and step count change, and the GPU's images match the CPU's.

UNet2DModel itself reads its class labels back in eager mode to check their range (a model-side
host read, outside the pipeline); the sync test replaces that check so that it covers the pipeline's
loop alone.
"""

from __future__ import annotations


import pytest
import torch
from support.cuda_sync import no_sync

import fusediff
from fusediff import ClassConditionalPipeline, UNet2DModel

pytestmark = pytest.mark.gpu

UNET = dict(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8, attention_head_dim=32, num_class_embeds=11)
TRAIN = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
SCHEDULERS = {"ddim": "DDIMScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
              "dpmpp_2m": "DPMSolverMultistepScheduler", "ddpm": "DDPMScheduler"}


def _pipe(scheduler: str = "ddim", dtype: torch.dtype = torch.float32, device: str = "cuda"
          ) -> ClassConditionalPipeline:
    torch.manual_seed(0)
    unet = UNet2DModel(**UNET).eval()
    pipe = ClassConditionalPipeline(unet=unet, scheduler=fusediff.DDIMScheduler(**TRAIN))
    pipe.scheduler = getattr(fusediff, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def _call(pipe, labels=(1, 7, 3), seed=0, scale=3.0, steps=4):
    return pipe(list(labels), guidance_scale=scale, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(seed), output_type="pt").images




@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_loop_never_synchronises(scheduler, scale):
    # fp32: guided Euler/DPM steps from sigma_max overflow a random fp16 UNet (no sync, but inf images)
    pipe = _pipe(scheduler, torch.float32)
    _call(pipe, scale=scale)  # warm-up: lazy kernels, pinned buffers
    with no_sync():
        out = _call(pipe, scale=scale)
    assert out.device.type == "cuda" and torch.isfinite(out).all()


# Euler ancestral starts from x_T scaled by sigma_max (~160 for this schedule), which overflows a random
# fp16 UNet to NaN in eager and graph alike: DDIM (unit-scale x_T) for fp16
@pytest.mark.parametrize("dtype, scheduler", [(torch.float32, "euler_a"), (torch.float16, "ddim")])
def test_cuda_graph_replays_equal_the_eager_loop(dtype, scheduler):
    pipe = _pipe(scheduler, dtype)
    calls = [dict(), dict(labels=(0, 9, 9), seed=4, scale=5.0), dict(seed=1, steps=6)]
    eager = [_call(pipe, **c) for c in calls]
    pipe.enable_cuda_graph()
    graphed = [_call(pipe, **c) for c in calls]
    for c, e, g in zip(calls, eager, graphed):
        assert torch.isfinite(e).all(), f"{c}: the eager images are not finite"
        assert torch.equal(e, g), f"{c}: max |diff| {(e.float() - g.float()).abs().max().item():.3g}"
    assert "unet step" in pipe.__dict__.get("_cuda_graphs", {})


def test_gpu_images_match_the_cpu_ones(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convolutions, as on the CPU
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cpu = _call(_pipe("ddim", device="cpu"))
    gpu = _call(_pipe("ddim")).cpu()
    diff = (cpu - gpu).abs().max().item()
    print(f"max |cpu - gpu| {diff:.2e}")
    assert diff <= 1e-3 and cpu.std() > 0.01
