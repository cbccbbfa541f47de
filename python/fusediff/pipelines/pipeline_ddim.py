"""DDIMPipeline: denoising diffusion implicit models sampling (Song et al. 2021, eq. 12)."""

from __future__ import annotations

import logging

import torch

from ..models import UNet2DModel
from ..schedulers import DDIMScheduler, SchedulerMixin
from ..utils.torch_utils import Generator
from .pipeline_utils import ImagePipelineOutput
from .unconditional import UnconditionalImagePipeline

logger = logging.getLogger(__name__)


class DDIMPipeline(UnconditionalImagePipeline):
    """Unconditional image generation with the DDIM sampler (any scheduler's config is converted)."""

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin) -> None:
        super().__init__()
        scheduler = DDIMScheduler.from_config(scheduler.config)  # as diffusers: any scheduler becomes DDIM
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: Generator = None, eta: float = 0.0,
                 num_inference_steps: int = 50, use_clipped_model_output: bool | None = None,
                 output_type: str = "pil", return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """Sample ``batch_size`` images in ``num_inference_steps`` DDIM steps.

        ``eta`` weighs the added noise: 0 is deterministic DDIM, 1 is DDPM-like;
        ``use_clipped_model_output`` re-derives the noise from the clipped x0 prediction.
        """
        if not 0.0 <= eta <= 1.0:
            logger.warning("eta=%s is outside [0, 1] (0 is DDIM, 1 is DDPM-like); results may be poor", eta)
        return self._run(batch_size, num_inference_steps, generator, output_type, return_dict,
                         noise_dtype=self.unet.dtype,
                         step_kwargs={"eta": eta, "use_clipped_model_output": use_clipped_model_output,
                                      "generator": generator})
