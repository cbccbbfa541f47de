"""Stable Diffusion image-to-image (SDEdit, Meng et al. 2022): noise an image's latents part-way, then denoise.

    z_0 = scaling_factor * E(image)   (a posterior sample, drawn with the generator)
    k = int(n * strength); the run keeps the last k of the n scheduled timesteps, t_1 > ... > t_k
    z_{t_1} = scheduler.add_noise(z_0, N(0, I), t_1)
    then the text-to-image loop from t_1 (classifier-free guidance, scheduler steps) and decoding.

strength = 1 starts from (almost) pure noise, small strengths keep the input's layout. Random
draws come in diffusers' order: the VAE posterior sample(s), then the noise, then the scheduler's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..sampling import check_generators, check_strength, set_timesteps
from ..utils.torch_utils import Generator, randn_tensor
from . import text_conditioning as tc
from .pipeline_stable_diffusion import StableDiffusionBase, StableDiffusionPipelineOutput


class StableDiffusionImg2ImgPipeline(StableDiffusionBase):
    """Text-guided image-to-image generation with Stable Diffusion; loads any Stable Diffusion directory."""

    def prepare_image_latents(self, image: torch.Tensor, batch: int, dtype: torch.dtype,
                              generator: Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_0, the noise that takes it to t_1) for ``batch`` images from the preprocessed ``image`` (or from
        latents of 4 channels)."""
        image = image.to(device=self.device, dtype=dtype)
        if image.shape[1] == self.vae.config.latent_channels:
            init = image
        else:
            check_generators(generator, batch)
            if isinstance(generator, (list, tuple)):  # one posterior sample per output, each with its generator
                image = tc.spread_batch(image, batch)
            init = tc.encode_image(self.vae, image, generator)
        init = tc.spread_batch(init, batch)
        noise = randn_tensor(init.shape, generator=generator, device=self.device, dtype=dtype)
        return init, noise

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, image: Any = None, strength: float = 0.8,
                 num_inference_steps: int = 50, timesteps: Sequence[int] | None = None,
                 sigmas: Sequence[float] | None = None, guidance_scale: float = 7.5,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator: Generator = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, clip_skip: int | None = None,
                 callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                 ) -> StableDiffusionPipelineOutput | tuple:
        """Re-generate ``image`` (PIL, numpy in [0, 1], torch in [0, 1], or a list) following ``prompt``.

        ``strength`` in [0, 1] is how much of the schedule runs (how far the image may change);
        the output has the input's size floored to a multiple of the VAE factor. Other arguments
        as :meth:`StableDiffusionPipeline.__call__`.
        """
        check_strength(strength)
        if image is None:
            raise ValueError("image-to-image needs an image")
        self.check_common(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
                          output_type, callback_on_step_end_tensor_inputs)
        # 1. text embeddings, 2. the image in [-1, 1]
        batch, state = self._conditioning(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                          num_images_per_prompt, clip_skip, guidance_scale)
        pixels = tc.preprocess_image(image, multiple=self.vae_scale_factor,
                                     latent_channels=self.vae.config.latent_channels)
        # 3. the schedule's last int(n * strength) steps, 4. z_0 and its noise, 5. denoise from z_0 noised to
        # the first of those steps, 6. decode
        run = set_timesteps(self.scheduler, num_inference_steps, timesteps=timesteps, sigmas=sigmas, strength=strength)
        dtype = state["prompt_embeds"].dtype
        image_latents, noise = self.prepare_image_latents(pixels, batch, dtype, generator)
        latents = self._denoise(noise, run, state, generator=generator, eta=eta, image_latents=image_latents,
                                start_from_noise=False, callback_on_step_end=callback_on_step_end,
                                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        return self._finish(latents, output_type, dtype, return_dict)
