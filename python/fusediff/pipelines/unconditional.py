"""The unconditional image pipelines' shared call (DDPM, DDIM, PNDM): x_T ~ N(0, I) of the UNet's
sample shape, :func:`fusediff.sampling.denoise` with ``unet(x, t)`` as the model, images in [0, 1].

Random numbers are drawn in the order of diffusers' pipeline of the same name, so a seeded CPU
run gives diffusers' images (DESIGN.md, decision 5).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..sampling import check_generators, check_steps, denoise, initial_noise, module_memory_format
from ..utils.torch_utils import Generator
from .pipeline_utils import (DiffusionPipeline, ImagePipelineOutput, check_output_type, postprocess_images,
                             unet_prediction)


class UnconditionalImagePipeline(DiffusionPipeline):
    """A UNet and a scheduler that sample images from noise; subclasses fix the scheduler type."""

    def _check(self, batch_size: int, num_inference_steps: int, generator: Generator, output_type: str) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        check_steps(num_inference_steps)
        check_generators(generator, batch_size)
        check_output_type(output_type)

    def _sample_shape(self, batch_size: int) -> tuple[int, ...]:
        size = self.unet.config.sample_size
        spatial = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.config.in_channels, *spatial)

    def _run(self, batch_size: int, num_inference_steps: int, generator: Generator, output_type: str,
             return_dict: bool, noise_dtype: torch.dtype | None,
             step_kwargs: dict[str, Any] | None = None) -> ImagePipelineOutput | tuple:
        """The call; ``noise_dtype`` is the dtype diffusers draws x_T in (then cast to the UNet's),
        ``step_kwargs`` the extra arguments of every ``scheduler.step``."""
        self._check(batch_size, num_inference_steps, generator, output_type)
        # 1. x_T ~ N(0, I), drawn as diffusers draws it, 2. x_{t-1} = step(unet(x_t, t), t, x_t)
        noise = initial_noise(self._sample_shape(batch_size), generator, self.device, noise_dtype).to(self.unet.dtype)
        image = denoise(self.scheduler, functools.partial(unet_prediction, self.unet), noise,
                        num_inference_steps=num_inference_steps, step_kwargs=step_kwargs,
                        progress=self.progress_bar, cuda_graph=self.model_call_graphs("unet step", self.unet),
                        memory_format=module_memory_format(self.unet))
        images = postprocess_images(image, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
