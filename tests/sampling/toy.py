"""Toy denoisers of any sample rank and a plain reference loop over HF diffusers' schedulers, for the
sampling tests: the reference is what a pipeline written the obvious way, with diffusers' scheduler,
computes."""

from __future__ import annotations

import diffusers
import torch
from torch import nn

# fusediff scheduler class -> (config overrides) run in the tests; the same class name exists in diffusers
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


class ToyDenoiser(nn.Module):
    """eps(x, t, cond) for (B, C, *spatial) samples of rank 1, 2 or 3: a convolution, a timestep scale and an
    additive condition; every sample of a batch is computed on its own."""

    def __init__(self, rank: int, channels: int = 2) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[rank]
        self.conv = conv(channels, channels, 3, padding=1)
        self.rank = rank

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x) * torch.cos(torch.as_tensor(t, dtype=torch.float32) / 1000)
        return out if cond is None else out + cond


def spatial_shape(rank: int) -> tuple[int, ...]:
    return {1: (24,), 2: (6, 5), 3: (3, 4, 5)}[rank]


def schedulers(name: str, **extra):
    """(fusediff scheduler, diffusers scheduler) of the same class and config."""
    import fusediff

    cls, overrides = SCHEDULERS[name]
    config = {**SCHEDULE, **overrides, **extra}
    return getattr(fusediff, cls)(**config), getattr(diffusers, cls)(**config)


def reference_loop(scheduler, model, noise: torch.Tensor, steps: int, *, cond=None, uncond=None, scale=None,
                   step_kwargs=None, start_index=None, image_latents=None, from_noise=True, mask=None,
                   callback=None) -> torch.Tensor:
    """The loop written out: x_T = noise * init_noise_sigma, or (``from_noise=False``) the image latents
    noised to the first timestep, which is ``timesteps[start_index * order]`` when given; then per step
    scale_model_input, the model (two calls under guidance), step, the inpainting blend with ``mask``
    and ``callback(i, x, cond) -> (x, cond)``."""
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    if start_index is not None:
        order = getattr(scheduler, "order", 1)
        timesteps = timesteps[start_index * order:]
        if hasattr(scheduler, "set_begin_index"):  # as diffusers' img2img pipelines
            scheduler.set_begin_index(start_index * order)
    if from_noise:
        x = noise * scheduler.init_noise_sigma
    else:
        x = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(noise.shape[0]))
    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(x, t)
        if scale is None:
            eps = model(x_in, t, cond)
        else:
            eps_u, eps_c = model(x_in, t, uncond), model(x_in, t, cond)
            eps = eps_u + scale * (eps_c - eps_u)
        x = scheduler.step(eps, t, x, **(step_kwargs or {})).prev_sample
        if mask is not None:
            keep = image_latents if i == len(timesteps) - 1 else scheduler.add_noise(image_latents, noise,
                                                                                   timesteps[i + 1:i + 2])
            x = (1 - mask) * keep + mask * x
        if callback is not None:
            x, cond = callback(i, x, cond)
    return x
