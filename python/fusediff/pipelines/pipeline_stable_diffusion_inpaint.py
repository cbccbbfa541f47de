"""Stable Diffusion inpainting: regenerate the masked part of an image, keep the rest.

mask = 1 where the image is repainted (mask_image >= 0.5), 0 where it is kept; m is the mask at
latent resolution (nearest), z_img = scaling_factor * E(image), z_masked = scaling_factor * E(image * (1 - mask)).

- A 9-channel inpainting UNet (SD-inpainting checkpoints) sees the condition at every step:
  eps = unet([z_t, m, z_masked], t, c).
- A plain 4-channel UNet uses diffusers' legacy blend (RePaint-like, Lugmayr et al. 2022): after
  each step, z_{t_{i+1}} <- (1 - m) * add_noise(z_img, eps_0, t_{i+1}) + m * z_{t_{i+1}}, with the
  same noise eps_0 as the start, and (1 - m) * z_img + m * z_0 after the last step.

strength < 1 starts from z_img noised to the first kept timestep (as img2img); strength = 1 from pure
noise. Random draws in diffusers' order: posterior sample of the image (4-channel UNet, or strength < 1),
the start noise, the posterior sample of the masked image, then the scheduler's. ``padding_mask_crop``
(diffusers' crop-to-mask option) is left out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..sampling import check_generators, check_strength, set_timesteps
from ..utils.torch_utils import Generator, randn_tensor
from . import text_conditioning as tc
from .pipeline_stable_diffusion import StableDiffusionBase, StableDiffusionPipelineOutput


class StableDiffusionInpaintPipeline(StableDiffusionBase):
    """Text-guided inpainting with Stable Diffusion: 9-channel inpainting UNets and plain 4-channel ones."""

    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds", "mask", "masked_image_latents")
    _scheduler_fixes = {"steps_offset": 1, "skip_prk_steps": True}

    def _start_latents(self, shape: tuple[int, ...], dtype: torch.dtype, generator: Generator,
                       latents: torch.Tensor | None, image: torch.Tensor, from_noise: bool,
                       need_image_latents: bool) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """(the start noise, z_img when needed, whether the run starts from the noise): the noise is drawn,
        or ``latents``, which the run then starts from whatever ``strength`` is."""
        check_generators(generator, shape[0])
        image_latents = None
        if need_image_latents or (latents is None and not from_noise):
            image = image.to(device=self.device, dtype=dtype)
            image_latents = image if image.shape[1] == shape[1] else tc.encode_image(self.vae, image, generator)
            image_latents = tc.spread_batch(image_latents, shape[0], contiguous=True)
        if latents is None:
            return randn_tensor(shape, generator=generator, device=self.device, dtype=dtype), image_latents, from_noise
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {tuple(shape)}")
        return latents.to(self.device), image_latents, True

    def _mask_latents(self, mask: torch.Tensor, masked_image: torch.Tensor, batch: int, height: int, width: int,
                      dtype: torch.dtype, generator: Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """m at latent resolution and z_masked, both spread to ``batch`` and doubled under guidance."""
        size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        mask = torch.nn.functional.interpolate(mask, size=size).to(device=self.device, dtype=dtype)
        masked_image = masked_image.to(device=self.device, dtype=dtype)
        if masked_image.shape[1] != self.vae.config.latent_channels:
            masked_image = tc.encode_image(self.vae, masked_image, generator)
        mask = tc.spread_batch(mask, batch, "masks", contiguous=True)
        masked_image = tc.spread_batch(masked_image, batch, contiguous=True)
        if self.do_classifier_free_guidance:
            mask, masked_image = torch.cat([mask] * 2), torch.cat([masked_image] * 2)
        return mask, masked_image.to(device=self.device, dtype=dtype)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, image: Any = None, mask_image: Any = None,
                 masked_image_latents: torch.Tensor | None = None, height: int | None = None,
                 width: int | None = None, strength: float = 1.0, num_inference_steps: int = 50,
                 timesteps: Sequence[int] | None = None, sigmas: Sequence[float] | None = None,
                 guidance_scale: float = 7.5, negative_prompt: str | list[str] | None = None,
                 num_images_per_prompt: int = 1, eta: float = 0.0, generator: Generator = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, clip_skip: int | None = None,
                 callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                 ) -> StableDiffusionPipelineOutput | tuple:
        """Repaint the part of ``image`` where ``mask_image`` is white (>= 0.5), following ``prompt``.

        ``image`` as for img2img; ``mask_image`` a PIL image, array or tensor (one channel or
        converted to grey). Both are resized to ``height`` x ``width`` (default: the UNet's
        sample size in pixels). ``masked_image_latents`` replaces the encoded masked image.
        ``strength`` < 1 keeps part of the image's content under the mask too. Other arguments
        as :meth:`StableDiffusionPipeline.__call__`.
        """
        height, width = tc.image_size(height, width, self.default_size(), max(8, self.vae_scale_factor))
        check_strength(strength)
        if image is None or mask_image is None:
            raise ValueError("inpainting needs an image and a mask_image")
        self.check_common(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
                          output_type, callback_on_step_end_tensor_inputs)
        unet_channels = self.unet.config.in_channels
        latent_channels = self.vae.config.latent_channels
        if unet_channels not in (latent_channels, 2 * latent_channels + 1):
            raise ValueError(f"the UNet takes {unet_channels} channels; inpainting needs {latent_channels} "
                             f"(latents) or {2 * latent_channels + 1} (latents, mask, masked-image latents)")
        # 1. text embeddings, 2. the schedule (the last int(n * strength) steps)
        batch, state = self._conditioning(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                          num_images_per_prompt, clip_skip, guidance_scale)
        run = set_timesteps(self.scheduler, num_inference_steps, timesteps=timesteps, sigmas=sigmas, strength=strength)
        # 3. the start noise (and z_img, for the 4-channel blend or a start part-way)
        init_image = tc.preprocess_image(image, height, width, multiple=self.vae_scale_factor,
                                         latent_channels=latent_channels).to(dtype=torch.float32)
        dtype = state["prompt_embeds"].dtype
        shape = (batch, latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        blend = unet_channels == latent_channels
        noise, image_latents, from_noise = self._start_latents(shape, dtype, generator, latents, init_image,
                                                               from_noise=strength == 1.0, need_image_latents=blend)
        # 4. the mask and the masked image's latents
        mask = tc.preprocess_image(mask_image, height, width, multiple=self.vae_scale_factor, mask=True,
                                   latent_channels=latent_channels)
        masked = init_image * (mask < 0.5) if masked_image_latents is None else masked_image_latents
        mask, masked = self._mask_latents(mask, masked, batch, height, width, dtype, generator)
        # 5. denoise: a 9-channel UNet sees the condition, a 4-channel one is blended after each step; 6. decode
        condition = {"mask": mask, "masked_image_latents": masked}
        latents = self._denoise(noise, run, state, generator=generator, eta=eta, image_latents=image_latents,
                                start_from_noise=from_noise, mask=mask if blend else None,
                                model_inputs=None if blend else condition,
                                callback_tensors={"masked_image_latents": masked} if blend else None,
                                callback_on_step_end=callback_on_step_end,
                                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        return self._finish(latents, output_type, dtype, return_dict)
