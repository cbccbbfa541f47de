"""DeepFloyd IF stage I image-to-image (SDEdit, Meng et al. 2022, in pixel space): noise an image part-way, denoise.

    x_0 = the image in [-1, 1], one row per prompt, each repeated num_images_per_prompt times
    k = int(n * strength); the run keeps the last k of the n scheduled timesteps, t_1 > ... > t_k
    x_{t_1} = scheduler.add_noise(x_0, N(0, I), t_1)
    then stage I's loop from t_1 (guidance on eps, learned-range DDPM steps), see :mod:`.pipeline_if`.

Images are read by :func:`~fusediff.pipelines.pipeline_if_images.if_image_tensor`: PIL images are
resized to the UNet's sample size (short side, aspect kept) and mapped to [-1, 1]; arrays and
tensors are taken as already in [-1, 1]. Random draws come in diffusers' order: the start noise, then
the scheduler's. Differences from diffusers: those of :mod:`.pipeline_if` and
:mod:`.pipeline_if_images`, and sides that are no multiple of the UNet's down-sampling factor raise a
ValueError (diffusers fails inside the UNet).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..sampling import check_generators, check_strength, set_timesteps
from ..utils.torch_utils import Generator, randn_tensor
from .pipeline_if import Callback, IFBase, IFPipelineOutput, step_callback
from .pipeline_if_images import check_image, if_image_tensor
from . import text_conditioning as tc


class IFImg2ImgPipeline(IFBase):
    """DeepFloyd IF stage I, text-guided image-to-image; loads any IF stage-I directory (components as
    :class:`~fusediff.IFPipeline`'s)."""

    def read_image(self, image: Any, prompts: int) -> torch.Tensor:
        """The (prompts, C, H, W) images in [-1, 1], checked against the UNet (channels, size multiple)."""
        pixels = if_image_tensor(image, resize_to=self.default_size()[0])
        check_image(pixels, self.unet.config.in_channels, self.size_multiple(), prompts)
        return pixels

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, image: Any = None, strength: float = 0.7,
                 num_inference_steps: int = 80, timesteps: Sequence[int] | None = None, guidance_scale: float = 10.0,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator: Generator = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, callback: Callback | None = None, callback_steps: int = 1,
                 clean_caption: bool = False, callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)) -> IFPipelineOutput | tuple:
        """Re-generate ``image`` (one per prompt: PIL, numpy or torch, or a list) following ``prompt``.

        ``strength`` in [0, 1] is how much of the schedule runs (how far the image may change); the
        output has the (resized) input's size. Other arguments as :meth:`IFPipeline.__call__`.
        """
        check_strength(strength)
        if image is None:
            raise ValueError("image-to-image needs an image")
        self.check_common(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
                          output_type, clean_caption)
        on_step = step_callback(callback, callback_steps, callback_on_step_end)
        pixels = self.read_image(image, tc.batch_size_of(prompt, prompt_embeds))
        # 1. text embeddings, 2. the last int(n * strength) steps, 3. x_0 (each prompt's image repeated) and
        # the noise that takes it to t_1
        batch, state = self._conditioning(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                          num_images_per_prompt, guidance_scale)
        run = set_timesteps(self.scheduler, num_inference_steps, timesteps=timesteps, strength=strength)
        dtype = state["prompt_embeds"].dtype
        x0 = pixels.to(device=self.device, dtype=dtype).repeat_interleave(num_images_per_prompt, dim=0)
        check_generators(generator, batch)
        noise = randn_tensor(x0.shape, generator=generator, device=self.device, dtype=dtype)
        # 4. denoise from x_0 noised to t_1
        out = self._denoise(noise, run, state, generator=generator, eta=eta, callback=on_step,
                            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, image=x0)
        return self._finish(out, output_type, return_dict)
