"""The sampling loop shared by the unconditional image pipelines (DDPM, DDIM, PNDM).

Each pipeline draws Gaussian noise of the UNet's sample shape, runs
``model(x, t) -> scheduler.step`` over ``scheduler.timesteps`` and maps the result from
[-1, 1] to images, drawing its random numbers in the same order as diffusers' pipeline of
the same name, so a seeded CPU run gives diffusers' images (DESIGN.md, decision 5).
"""

from __future__ import annotations

from typing import Any

import torch

from ..utils.torch_utils import Generator, randn_tensor
from .pipeline_utils import DiffusionPipeline, ImagePipelineOutput, check_output_type, postprocess_images
from .runtime import in_layout, loop_timesteps


class UnconditionalImagePipeline(DiffusionPipeline):
    """A UNet and a scheduler that sample images from noise; subclasses fix the scheduler type."""

    def _check(self, batch_size: int, num_inference_steps: int, generator: Generator, output_type: str) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int; got {num_inference_steps!r}")
        if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for batch_size {batch_size}; pass one per image")
        check_output_type(output_type)

    def _sample_shape(self, batch_size: int) -> tuple[int, ...]:
        size = self.unet.config.sample_size
        spatial = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.config.in_channels, *spatial)

    def _prediction(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The step's model call: what :meth:`enable_cuda_graph` captures."""
        return self.unet(x, t).sample

    def _run(self, batch_size: int, num_inference_steps: int, generator: Generator, output_type: str,
             return_dict: bool, noise_dtype: torch.dtype | None,
             step_kwargs: dict[str, Any] | None = None) -> ImagePipelineOutput | tuple:
        """The sampling loop; ``noise_dtype`` is the dtype diffusers draws x_T in (then cast to the UNet's),
        ``step_kwargs`` the extra arguments of every ``scheduler.step``."""
        self._check(batch_size, num_inference_steps, generator, output_type)
        # 1. x_T ~ N(0, I), drawn as diffusers draws it
        image = randn_tensor(self._sample_shape(batch_size), generator=generator, device=self.device,
                             dtype=noise_dtype).to(self.unet.dtype)
        image = in_layout(image, self.unet)
        # 2. the timesteps of this run: the scheduler steps with the host copy, the model reads the device one
        self.scheduler.set_timesteps(num_inference_steps)
        host_timesteps, timesteps = loop_timesteps(self.scheduler.timesteps, self.device)
        predict, graphed = self._graphed(self._prediction, "unet step", self.unet)
        # 3. x_{t-1} = step(model(x_t, t), t, x_t)
        for i, t_host in enumerate(self.progress_bar(host_timesteps)):
            model_output = predict(image, timesteps[i])
            if graphed:  # the graph's output buffer is overwritten next step; PNDM keeps earlier outputs
                model_output = model_output.clone()
            image = self.scheduler.step(model_output, t_host, image, **(step_kwargs or {})).prev_sample
        images = postprocess_images(image, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
