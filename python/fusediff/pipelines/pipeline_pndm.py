"""PNDMPipeline: pseudo numerical methods for diffusion models (Liu et al. 2022)."""

from __future__ import annotations

import torch

from ..models import UNet2DModel
from ..schedulers import PNDMScheduler, SchedulerMixin
from ..utils.torch_utils import Generator
from .pipeline_utils import ImagePipelineOutput
from .unconditional import UnconditionalImagePipeline


class PNDMPipeline(UnconditionalImagePipeline):
    """Unconditional image generation with PNDM (Runge-Kutta warm-up, then linear multistep)."""

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin) -> None:
        super().__init__()
        scheduler = PNDMScheduler.from_config(scheduler.config)
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int = 50, generator: Generator = None,
                 output_type: str = "pil", return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """Sample ``batch_size`` images in ``num_inference_steps`` steps; only the initial noise is random.

        As in diffusers, the initial noise is drawn in float32 (then cast to the UNet's dtype).
        """
        return self._run(batch_size, num_inference_steps, generator, output_type, return_dict, noise_dtype=None)
