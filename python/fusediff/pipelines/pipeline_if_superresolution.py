"""DeepFloyd IF stage II: text-conditioned super resolution with noise augmentation (Saharia et al. 2022, sec. 2.5;
Ho et al. 2022, cascaded diffusion's conditioning augmentation).

    y = bilinear_upsample(low-res image, (H, W), align_corners=True)        in [-1, 1]
    s = noise_level; y_s = image_noising_scheduler.add_noise(y, N(0, I), s)  the augmentation
    x_T ~ N(0, I) * init_noise_sigma                                         (B * n, 3, H, W)
    [eps | v] = unet([x_t, y_s], t, text, class_labels=s)                    the level as the class label
    guidance on eps, learned-range DDPM steps and outputs as stage I (:mod:`.pipeline_if`)

Random draws come in diffusers' order: x_T, then the augmentation noise, then the scheduler's.
The low-resolution image is read by :func:`~fusediff.pipelines.pipeline_if_images.if_image_tensor`
(PIL images mapped to [-1, 1] at their own size; arrays and tensors taken as in [-1, 1], e.g. stage
I's ``output_type="pt"``), one per prompt, repeated ``num_images_per_prompt`` times.

Differences from diffusers, beyond those of :mod:`.pipeline_if` and :mod:`.pipeline_if_images`:
- the scheduler's ``scale_model_input`` scales the noisy sample only: diffusers scales the
  concatenation, upsampled image included. DDPM's (IF's scheduler) is the identity, so the two
  agree there; with a sigma scheduler (Euler) fusediff leaves the conditioning image unscaled.
- a non-integer or out-of-range ``noise_level``, an image of the wrong channel count or a
  ``height`` / ``width`` that is no multiple of the UNet's down-sampling factor raise a ValueError
  before any work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..sampling import initial_noise, set_timesteps
from ..utils.torch_utils import Generator, randn_tensor
from .pipeline_if import Callback, IFBase, IFPipelineOutput, step_callback
from .pipeline_if_images import check_image, if_image_tensor
from . import text_conditioning as tc

logger = logging.getLogger(__name__)


class IFSuperResolutionPipeline(IFBase):
    """DeepFloyd IF stage II: a low-resolution image (stage I's) to H x W (256 x 256 for IF-II), text-conditioned.

    Components: as :class:`~fusediff.IFPipeline`'s, with a 6-channel ``unet`` (noisy sample and upsampled
    image) whose class embedding takes the noise level, and ``image_noising_scheduler``, the DDPM
    scheduler that noises the upsampled image.
    """

    _callback_tensor_inputs = (*IFBase._callback_tensor_inputs, "upscaled", "noise_level")

    def __init__(self, tokenizer: Any, text_encoder: Any, unet: Any, scheduler: Any, image_noising_scheduler: Any,
                 safety_checker: Any = None, feature_extractor: Any = None, watermarker: Any = None,
                 requires_safety_checker: bool = True) -> None:
        super(IFBase, self).__init__()
        if unet is not None and unet.config.in_channels != 6:
            logger.warning("%s: the UNet takes %d input channels; an IF super-resolution UNet takes 6 (the sample "
                           "and the upsampled image)", type(self).__name__, unet.config.in_channels)
        self._register(requires_safety_checker, safety_checker, feature_extractor, watermarker,
                       tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler,
                       image_noising_scheduler=image_noising_scheduler)

    def check_noise_level(self, noise_level: Any) -> int:
        steps = self.image_noising_scheduler.config.num_train_timesteps
        if isinstance(noise_level, bool) or not isinstance(noise_level, int) or not 0 <= noise_level < steps:
            raise ValueError(f"noise_level must be an int timestep of the image-noising scheduler, in [0, {steps}); "
                             f"got {noise_level!r}")
        return noise_level

    def prepare_upscaled(self, low: torch.Tensor, num_images_per_prompt: int, height: int, width: int,
                         noise_level: int, generator: Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(y_s, s): the low-resolution images (one per prompt, as ``if_image_tensor`` reads them) upsampled
        to (height, width) and noised to ``noise_level`` (drawn with ``generator``), and the level per row;
        both on the pipeline's device."""
        low = low.to(device=self.device, dtype=self.unet.dtype).repeat_interleave(num_images_per_prompt, dim=0)
        upscaled = F.interpolate(low, (height, width), mode="bilinear", align_corners=True)
        level = torch.tensor([noise_level] * upscaled.shape[0], device=upscaled.device)
        noise = randn_tensor(upscaled.shape, generator=generator, device=upscaled.device, dtype=upscaled.dtype)
        return self.image_noising_scheduler.add_noise(upscaled, noise, timesteps=level), level

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
                 image: Any = None, num_inference_steps: int = 50, timesteps: Sequence[int] | None = None,
                 guidance_scale: float = 4.0, negative_prompt: str | list[str] | None = None,
                 num_images_per_prompt: int = 1, eta: float = 0.0, generator: Generator = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, callback: Callback | None = None,
                 callback_steps: int = 1, noise_level: int = 250, clean_caption: bool = False,
                 callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)) -> IFPipelineOutput | tuple:
        """Upscale ``image`` (one low-resolution image per prompt) to ``height`` x ``width``.

        Args:
            height, width: output size in pixels (default the UNet's sample size), multiples of the
                UNet's down-sampling factor.
            noise_level: the augmentation timestep s of ``image_noising_scheduler`` (default 250, as
                diffusers); higher levels let the model change more of the input.
            Other arguments as :meth:`IFPipeline.__call__`.
        """
        if image is None:
            raise ValueError("super resolution needs the low-resolution image")
        self.check_common(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
                          output_type, clean_caption)
        self.check_noise_level(noise_level)
        height, width = tc.image_size(height, width, self.default_size(), self.size_multiple())
        on_step = step_callback(callback, callback_steps, callback_on_step_end)
        low = if_image_tensor(image)
        check_image(low, self.unet.config.in_channels // 2, 0, tc.batch_size_of(prompt, prompt_embeds))
        # 1. text embeddings, 2. timesteps, 3. x_T, 4. the upsampled, noised image and its level
        batch, state = self._conditioning(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                          num_images_per_prompt, guidance_scale)
        run = set_timesteps(self.scheduler, num_inference_steps, timesteps=timesteps)
        dtype = state["prompt_embeds"].dtype
        noise = initial_noise((batch, self.unet.config.in_channels // 2, height, width), generator, self.device, dtype)
        upscaled, level = self.prepare_upscaled(low, num_images_per_prompt, height, width, noise_level, generator)
        # 5. denoise with [x_t, y_s] as the UNet's input and s as its class label
        out = self._denoise(noise, run, state, generator=generator, eta=eta, callback=on_step,
                            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                            model_inputs={"noise_level": self._doubled(level), "upscaled": self._doubled(upscaled)})
        return self._finish(out, output_type, return_dict)
