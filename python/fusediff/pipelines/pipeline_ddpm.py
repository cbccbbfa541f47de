"""DDPMPipeline: ancestral sampling with a UNet2DModel (Ho et al. 2020, algorithm 2)."""

from __future__ import annotations

import torch

from ..models import UNet2DModel
from ..schedulers import DDPMScheduler
from ..utils.torch_utils import Generator
from .pipeline_utils import ImagePipelineOutput
from .unconditional import UnconditionalImagePipeline


class DDPMPipeline(UnconditionalImagePipeline):
    """Unconditional image generation with DDPM's ancestral sampler."""

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: Generator = None, num_inference_steps: int = 1000,
                 output_type: str = "pil", return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """Sample ``batch_size`` images in ``num_inference_steps`` steps.

        ``generator`` (one, or one per image) seeds the initial noise and every step's noise;
        ``output_type`` is "pil", "np" ((B, H, W, C) floats in [0, 1]) or "pt" ((B, C, H, W)).
        """
        return self._run(batch_size, num_inference_steps, generator, output_type, return_dict,
                         noise_dtype=self.unet.dtype, step_kwargs={"generator": generator})
