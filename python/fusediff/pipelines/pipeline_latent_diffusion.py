"""LDM text-to-image (Rombach et al. 2022, CompVis/ldm-text2im-large-256): a VQ autoencoder, LDMBert text
encoder and a cross-attention UNet.

    c = LDMBert(prompt), c0 = LDMBert("")             (B, 77, D), padded to the encoder's 77 positions
    z_T ~ N(0, I)                                     (B, C, H / f, W / f)
    eps = eps0 + w (eps_c - eps0)                     guidance whenever w != 1 (as diffusers)
    z_{t-1} = scheduler.step(eps, t, z_t, eta)
    image = vqvae.decode(z_0 / scaling_factor)        (the decoder quantises z_0 first)

Same random draws as diffusers' ``LDMTextToImagePipeline``. Differences, none of which changes a
DDIM or PNDM run: the generator also goes to ``scheduler.step`` (diffusers draws DDIM's eta > 0
noise from the global RNG even when a generator is given; with ``generator=None`` both use the
global RNG); latents are scaled by ``init_noise_sigma`` and the model input by
``scale_model_input`` (so sigma-space schedulers such as Euler or LMS work; both are identities
for DDIM and PNDM); the latent size is H / f with f the VQ model's factor (diffusers hard-codes 8,
which is f for every LDM checkpoint).
"""

from __future__ import annotations

import functools

import torch

from ..sampling import Guidance, denoise, initial_noise, module_memory_format
from ..utils.torch_utils import Generator
from . import text_conditioning as tc
from .pipeline_utils import DiffusionPipeline, ImagePipelineOutput, unet_prediction


class LDMTextToImagePipeline(DiffusionPipeline):
    """Text-to-image generation with the CompVis latent diffusion model (VQ-f8, LDMBert, UNet)."""

    def __init__(self, vqvae, bert, tokenizer, unet, scheduler) -> None:
        super().__init__()
        self.register_modules(vqvae=vqvae, bert=bert, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(vqvae.config.block_out_channels) - 1)

    def _encode(self, texts: list[str] | str) -> torch.Tensor:
        max_length = self.bert.config.max_position_embeddings  # 77 for LDM, the length diffusers pads to
        return tc.encode_text(self.tokenizer, self.bert, texts, max_length, self.device, warn_truncation=False)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 1.0, eta: float = 0.0,
                 generator: Generator = None, latents: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """Generate one image per prompt.

        ``guidance_scale`` w weighs classifier-free guidance (off at w = 1, LDM's default); ``eta``
        is DDIM's noise weight; ``generator`` one torch.Generator or one per prompt; ``latents``
        a z_T to start from; ``output_type`` "pil", "np", "pt" or "latent".
        """
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        height, width = tc.image_size(height, width, (h * self.vae_scale_factor, w * self.vae_scale_factor),
                                      max(8, self.vae_scale_factor))
        tc.check_prompts(prompt, None, None, None)
        tc.check_output_type(output_type)
        batch = tc.batch_size_of(prompt, None)
        guided = guidance_scale != 1.0
        # 1. text embeddings: the unconditional ones first, as diffusers encodes them
        negative = self._encode([""] * batch) if guided else None
        context = self._encode(prompt)
        if guided:
            context = torch.cat([negative, context])
        # 2. z_T ~ N(0, I), 3. z_{t-1} = step(guided eps, t, z_t)
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        noise = initial_noise(shape, generator, self.device, context.dtype, latents)
        latents = denoise(self.scheduler, functools.partial(unet_prediction, self.unet), noise,
                          num_inference_steps=num_inference_steps, model_kwargs={"encoder_hidden_states": context},
                          guidance=Guidance(guidance_scale) if guided else None, generator=generator, eta=eta,
                          progress=self.progress_bar, cuda_graph=self.model_call_graphs("unet step", self.unet),
                          memory_format=module_memory_format(self.unet))
        if output_type == "latent":
            return ImagePipelineOutput(images=latents) if return_dict else (latents,)
        # 4. decode; diffusers multiplies by 1 / scaling_factor, kept for bit-equal latents
        image = tc.decode_latents(self.vqvae, (1 / self.vqvae.config.scaling_factor) * latents, scaling_factor=1.0)
        images = tc.postprocess(image, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
