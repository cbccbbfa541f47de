"""GLIDE's 64 -> 256 upsampler (Nichol et al. 2021, arXiv:2112.10741, Sec. 4), and its inpainting variant.

    y = quantize(low-res image)                             ((y + 1) 127.5).round() / 127.5 - 1, as the notebooks
    x_T = upsample_temp * N(0, I)                           (B * n, 3, 256, 256); upsample_temp 0.997
    [eps | v] = unet([x_t (, image * keep, keep), up(y)], t, text)   up: bilinear, align_corners=False
    x_{t-1} = DDPM step (learned range, x0 clipped)         respacing "fast27" by default; inpainting as the base

Text conditions the upsampler too (its own text encoder); glide-text2im runs it without guidance, so
``guidance_scale`` defaults to 1 (above 1 it guides as the base pipeline does). Its text-to-image notebook
samples the upsampler with DDIM (``ddim_sample_loop``, eta 0) and its inpainting notebook with the DDPM
loop; these pipelines run the DDPM loop (fusediff's DDIMScheduler takes no custom timesteps, which
"fast27" needs). Everything else, random draws included, as :mod:`.pipeline_glide`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..models.glide_unet import glide_conditioning
from ..utils.torch_utils import Generator
from . import pipeline_utils
from .glide_common import quantize
from .pipeline_glide import GlideBase
from .pipeline_if_images import if_image_tensor
from .pipeline_utils import ImagePipelineOutput

UPSAMPLE_TEMP = 0.997  # glide-text2im's notebooks: "1.0 is sharper, but sometimes results in grainy artifacts"


class GlideUpsamplePipeline(GlideBase):
    """GLIDE's upsampler: a 64 x 64 image (the base pipeline's) to 256 x 256, text-conditioned."""

    super_res = True
    default_respacing = "fast27"

    def low_res(self, image: Any, batch: int, n: int) -> torch.Tensor:
        """The low-resolution images (one, or one per prompt), quantized to 8 bits, as (B * n, 3, h, w)."""
        if image is None:
            raise ValueError("the upsampler needs the low-resolution image")
        low = if_image_tensor(image)
        if low.shape[1] != 3:
            raise ValueError(f"image must have 3 channels; got shape {tuple(low.shape)}")
        if low.shape[0] not in (1, batch):
            raise ValueError(f"got {low.shape[0]} images for {batch} prompts; pass one, or one per prompt")
        low = quantize(low.float().clamp(-1, 1)).expand(batch, -1, -1, -1).repeat_interleave(n, 0)
        return low.to(device=self.device, dtype=self.unet.dtype)

    def _upsample(self, prompt: Any, image: Any, original_image: Any, mask_image: Any, num_images_per_prompt: int,
                  guidance_scale: float, negative_prompt: Any, upsample_temp: float, run: Any, generator: Generator,
                  latents: torch.Tensor | None, output_type: str, return_dict: bool,
                  callback_on_step_end: Callable[..., Any] | None,
                  callback_on_step_end_tensor_inputs: Sequence[str]) -> ImagePipelineOutput | tuple:
        self.check_components()
        self.check_count(num_images_per_prompt)
        pipeline_utils.check_output_type(output_type)
        if isinstance(upsample_temp, bool) or not isinstance(upsample_temp, (int, float)) or upsample_temp <= 0:
            raise ValueError(f"upsample_temp must be a positive number; got {upsample_temp!r}")
        size = self.default_size()
        batch = len(self.texts(prompt, negative_prompt)[0])
        low = self.low_res(image, batch, num_images_per_prompt)
        known = keep = None
        if self.inpaint:
            known = self.images_for(original_image, batch, num_images_per_prompt, size, "original_image")
            keep = 1 - self.images_for(mask_image, batch, num_images_per_prompt, size, "mask_image", mask=True)
        conditioning = glide_conditioning(size, low, known, keep)
        x = self._sample(prompt, negative_prompt, num_images_per_prompt, guidance_scale, size, run, generator,
                         latents, float(upsample_temp), conditioning, known, keep, callback_on_step_end,
                         callback_on_step_end_tensor_inputs)
        return self._finish(x, output_type, return_dict)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], image: Any, num_images_per_prompt: int = 1,
                 guidance_scale: float = 1.0, negative_prompt: str | list[str] | None = None,
                 upsample_temp: float = UPSAMPLE_TEMP, timestep_respacing: str | int | None = None,
                 num_inference_steps: int | None = None, timesteps: Sequence[int] | None = None,
                 generator: Generator = None, latents: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, callback_on_step_end: Callable[..., Any] | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)) -> ImagePipelineOutput | tuple:
        """Upsample ``image`` (the base stage's ``output_type="pt"`` sample, PIL images or arrays in [-1, 1];
        one, or one per prompt) to the UNet's size.

        Args:
            upsample_temp: the initial noise's scale (0.997, glide-text2im's); ``latents``, if given, are
                scaled by it too.
            timestep_respacing: "fast27" by default (glide-text2im's notebooks).
            Other arguments as :meth:`~fusediff.GlidePipeline.__call__`.
        """
        run = self.run_timesteps(timestep_respacing, num_inference_steps, timesteps)
        return self._upsample(prompt, image, None, None, num_images_per_prompt, guidance_scale, negative_prompt,
                              upsample_temp, run, generator, latents, output_type, return_dict,
                              callback_on_step_end, callback_on_step_end_tensor_inputs)


class GlideUpsampleInpaintPipeline(GlideUpsamplePipeline):
    """GLIDE's inpainting upsampler: the inpainted 64 x 64 image to 256 x 256, keeping the known part of
    ``original_image`` (256 x 256) where ``mask_image`` is 0."""

    inpaint = True

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], image: Any, original_image: Any, mask_image: Any,
                 num_images_per_prompt: int = 1, guidance_scale: float = 1.0,
                 negative_prompt: str | list[str] | None = None, upsample_temp: float = UPSAMPLE_TEMP,
                 timestep_respacing: str | int | None = None, num_inference_steps: int | None = None,
                 timesteps: Sequence[int] | None = None, generator: Generator = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                 callback_on_step_end: Callable[..., Any] | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)) -> ImagePipelineOutput | tuple:
        """``image``: the low-resolution (inpainted) sample; ``original_image`` and ``mask_image`` (1 = repaint)
        at the UNet's size (diffusers' IF inpainting names). Other arguments as the upsampler's."""
        run = self.run_timesteps(timestep_respacing, num_inference_steps, timesteps)
        return self._upsample(prompt, image, original_image, mask_image, num_images_per_prompt, guidance_scale,
                              negative_prompt, upsample_temp, run, generator, latents, output_type, return_dict,
                              callback_on_step_end, callback_on_step_end_tensor_inputs)
