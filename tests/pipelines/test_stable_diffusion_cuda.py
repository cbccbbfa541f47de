"""Stable Diffusion on a CUDA device: the whole pipeline (fused GroupNorm+SiLU, attention, time MLP
and scheduler step) on the GPU against the same run on the CPU, with CPU generators. Text
embeddings are passed in, so the test needs no text encoder (transformers is not on the GPU
machine)."""

from __future__ import annotations

import pytest
import torch
from support.configs import GPU_PIPE_UNET, GPU_PIPE_VAE

from fusediff import (AutoencoderKL, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                      StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, UNet2DConditionModel)

pytestmark = pytest.mark.gpu

UNET, VAE = GPU_PIPE_UNET, GPU_PIPE_VAE
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SCHEDULERS = {"dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
              "euler_a": (EulerAncestralDiscreteScheduler, {})}


def _pipe(cls, scheduler: str):
    torch.manual_seed(0)
    scheduler_cls, extra = SCHEDULERS[scheduler]
    pipe = cls(vae=AutoencoderKL(**VAE).eval(), text_encoder=None, tokenizer=None,
               unet=UNet2DConditionModel(**UNET).eval(), scheduler=scheduler_cls(**SCHEDULER, **extra),
               requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 77, 64, generator=g).to(dtype), torch.randn(2, 77, 64, generator=g).to(dtype)


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 convolutions and matmuls in full precision on the GPU, so the CPU run is a fair reference."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_text_to_image_cuda_matches_cpu(scheduler):
    pipe = _pipe(StableDiffusionPipeline, scheduler)
    cond, uncond = _embeds()

    def run(device):
        return pipe.to(device)(prompt_embeds=cond.to(device), negative_prompt_embeds=uncond.to(device),
                               guidance_scale=3.0, num_inference_steps=8, height=32, width=32,
                               generator=torch.Generator().manual_seed(0), output_type="latent").images

    cpu = run("cpu")
    gpu = run("cuda")
    assert gpu.is_cuda and gpu.shape == cpu.shape == (2, 4, 16, 16)
    diff = (gpu.cpu() - cpu).abs().max().item() / cpu.abs().max().item()
    assert diff < 1e-3, f"{scheduler}: max |cuda - cpu| / max |cpu| = {diff:.3e} (final latents)"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_text_to_image_low_precision_on_cuda(dtype):
    """A half-precision GPU run against the fp32 GPU run from the same latents: the final latents
    agree to the dtype's rounding accumulated through 8 steps."""
    pipe = _pipe(StableDiffusionPipeline, "dpmpp_2m_karras").to("cuda")
    cond, uncond = _embeds()
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to("cuda")
    kwargs = dict(guidance_scale=3.0, num_inference_steps=8, height=32, width=32, output_type="latent")
    full = pipe(prompt_embeds=cond.cuda(), negative_prompt_embeds=uncond.cuda(), latents=latents, **kwargs).images
    low = pipe.to(dtype)(prompt_embeds=cond.to("cuda", dtype), negative_prompt_embeds=uncond.to("cuda", dtype),
                         latents=latents.to(dtype), **kwargs).images
    assert low.dtype == dtype and torch.isfinite(low).all()
    diff = (low.float() - full).abs().max().item() / full.abs().max().item()
    assert diff < (0.02 if dtype == torch.float16 else 0.08), f"max |{dtype} - fp32| / max |fp32| = {diff:.3e}"


def test_img2img_cuda_matches_cpu():
    pipe = _pipe(StableDiffusionImg2ImgPipeline, "euler_a")
    cond, uncond = _embeds()
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))

    def run(device):
        return pipe.to(device)(prompt_embeds=cond.to(device), negative_prompt_embeds=uncond.to(device),
                               image=image.to(device), strength=0.6, guidance_scale=5.0, num_inference_steps=10,
                               generator=torch.Generator().manual_seed(0), output_type="latent").images

    cpu = run("cpu")
    gpu = run("cuda")
    diff = (gpu.cpu() - cpu).abs().max().item() / cpu.abs().max().item()
    assert diff < 1e-3, f"max |cuda - cpu| / max |cpu| = {diff:.3e} (final latents)"
