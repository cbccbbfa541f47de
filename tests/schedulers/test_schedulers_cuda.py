"""The Stable Diffusion schedulers on a CUDA device: a whole run with CUDA tensors (the fused CUDA
step) equals the same run with CPU tensors (the reference step), noise drawn from CPU generators."""

from __future__ import annotations

import pytest
import torch

import fusediff

pytestmark = pytest.mark.gpu

RUNS = [  # (scheduler, config, step arguments)
    ("EulerDiscreteScheduler", {}, {}),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "prediction_type": "v_prediction"},
     {"s_churn": 0.5, "s_tmin": 0.0, "s_tmax": 100.0}),
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("HeunDiscreteScheduler", {"use_karras_sigmas": True}, {}),
    ("LMSDiscreteScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, {}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}, {}),
    ("DEISMultistepScheduler", {"solver_order": 3}, {}),
    ("UniPCMultistepScheduler", {"solver_order": 3, "thresholding": True, "prediction_type": "sample"}, {}),
]
SHAPE = (2, 4, 16, 16)


def _run(name: str, config: dict, step_kwargs: dict, device: str) -> torch.Tensor:
    scheduler = getattr(fusediff, name)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **config)
    scheduler.set_timesteps(10, device=device)
    weight = torch.linspace(-0.5, 0.5, SHAPE[1]).view(1, -1, 1, 1).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen).to(device) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        model_output = torch.tanh(model_input) + weight  # a fixed smooth "model"
        kwargs = dict(step_kwargs)
        if name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler") or "sde" in str(config):
            kwargs["generator"] = gen
        x = scheduler.step(model_output, t, x, **kwargs).prev_sample
    return x


@pytest.mark.parametrize("name, config, step_kwargs", RUNS, ids=[f"{r[0]}-{i}" for i, r in enumerate(RUNS)])
def test_cuda_run_matches_cpu_run(name, config, step_kwargs):
    cpu = _run(name, config, step_kwargs, "cpu")
    gpu = _run(name, config, step_kwargs, "cuda")
    assert gpu.is_cuda and gpu.dtype == cpu.dtype
    diff = (gpu.cpu() - cpu).abs().max().item()
    scale = cpu.abs().max().item()
    assert diff <= 1e-5 * scale + 1e-5, f"{name} {config}: max |cuda - cpu| = {diff:.3e} (max |x| {scale:.3e})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_ddpm_learned_range_thresholding_cuda_run_matches_cpu_run(dtype):
    """DeepFloyd IF's DDPM (learned_range, dynamic thresholding): the fused CUDA step (noise scale and
    thresholding in the kernels, the model output halves as views) against the CPU reference run."""
    def run(device):
        scheduler = fusediff.DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                                           thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5)
        scheduler.set_timesteps(10, device=device)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(SHAPE, generator=gen).to(device, dtype)
        weight = torch.linspace(-0.5, 0.5, SHAPE[1]).view(1, -1, 1, 1).to(device, dtype)
        for t in scheduler.timesteps:
            model_output = torch.cat([2.0 * torch.tanh(x) + weight, torch.tanh(x - weight)], dim=1)  # (B, 2C, H, W)
            x = scheduler.step(model_output, t, x, generator=gen).prev_sample
        return x

    cpu, gpu = run("cpu"), run("cuda")
    assert gpu.is_cuda and gpu.dtype == cpu.dtype == dtype
    diff = (gpu.cpu().float() - cpu.float()).abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert diff <= tol, f"DDPM learned_range + thresholding {dtype}: max |cuda - cpu| = {diff:.3e}"
