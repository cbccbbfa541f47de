"""unCLIP text-to-image (DALL-E 2, Ramesh et al. 2022, arXiv:2204.06125; Kakao Brain's Karlo).

    y, c, m  = CLIP(prompt) text embedding, token states, mask        [""; prompt] under guidance
    z_T ~ N(0, I)                                                     (B, D) CLIP image embedding
    z_0      = denoise(prior(z, t, y, c, m)), guided with prior_guidance_scale    the prior (sec. 2.2)
    e_img    = z_0 * clip_std + clip_mean
    image    = decoder (64x64) -> super-resolution (256x256)        :mod:`.unclip_stages` (sec. 2.1)

Guidance runs in both the prior and the decoder whenever either scale is above 1 (diffusers'
rule), each stage with its own scale. Components, ``model_index.json`` and the call's arguments are
diffusers 0.42.1's ``UnCLIPPipeline``'s, so a directory saved by either library loads in the other and
a seeded CPU run gives diffusers' images; every stage runs :func:`fusediff.sampling.denoise`.

Differences from diffusers: bad input (a prompt that is neither str nor list, neither or both of
prompt and ``text_model_output``, step counts below 2, an unknown ``output_type``) raises ValueError before any
work; ``output_type="pt"`` returns a (B, 3, H, W) tensor in [0, 1] (diffusers returns numpy for
anything but "pil"); ``"numpy"`` is read as ``"np"``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..sampling import Guidance, denoise, initial_noise
from ..utils.torch_utils import Generator
from .pipeline_utils import ImagePipelineOutput
from .unclip_stages import UnCLIPStages, check_scale, check_steps


def prior_prediction(prior: Any, x: torch.Tensor, t: torch.Tensor, proj_embedding: torch.Tensor,
                     encoder_hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The prior's predicted image embedding for (B, D) embeddings x at t: a loop's ``predict``."""
    return prior(x, timestep=t, proj_embedding=proj_embedding, encoder_hidden_states=encoder_hidden_states,
                 attention_mask=attention_mask).predicted_image_embedding


class UnCLIPPipeline(UnCLIPStages):
    """Text-to-image with unCLIP: CLIP text encoder -> prior -> decoder -> two super-resolution UNets."""

    def __init__(self, prior: Any, decoder: Any, text_encoder: Any, tokenizer: Any, text_proj: Any,
                 super_res_first: Any, super_res_last: Any, prior_scheduler: Any, decoder_scheduler: Any,
                 super_res_scheduler: Any) -> None:
        super().__init__()
        self.register_modules(prior=prior, decoder=decoder, text_encoder=text_encoder, tokenizer=tokenizer,
                              text_proj=text_proj, super_res_first=super_res_first, super_res_last=super_res_last,
                              prior_scheduler=prior_scheduler, decoder_scheduler=decoder_scheduler,
                              super_res_scheduler=super_res_scheduler)

    def _prior(self, prompt_embeds: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor, batch: int,
               *, guided: bool, guidance_scale: float, num_inference_steps: int, generator: Generator,
               latents: torch.Tensor | None) -> torch.Tensor:
        """The prior's (B, D) CLIP image embeddings (post-processed) for the text conditions."""
        noise = initial_noise((batch, self.prior.config.embedding_dim), generator, self.device, prompt_embeds.dtype,
                              latents)
        z = denoise(self.prior_scheduler, functools.partial(prior_prediction, self.prior), noise,
                    num_inference_steps=num_inference_steps,
                    model_kwargs={"proj_embedding": prompt_embeds, "encoder_hidden_states": text_states,
                                  "attention_mask": text_mask},
                    guidance=Guidance(guidance_scale) if guided else None, generator=generator,
                    progress=self.progress_bar, cuda_graph=self.model_call_graphs("prior step", self.prior))
        return self.prior.post_process_latents(z)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
                 prior_num_inference_steps: int = 25, decoder_num_inference_steps: int = 25,
                 super_res_num_inference_steps: int = 7, generator: Generator = None,
                 prior_latents: torch.Tensor | None = None, decoder_latents: torch.Tensor | None = None,
                 super_res_latents: torch.Tensor | None = None, text_model_output: Any = None,
                 text_attention_mask: torch.Tensor | None = None, prior_guidance_scale: float = 4.0,
                 decoder_guidance_scale: float = 8.0, output_type: str = "pil",
                 return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """Generate 256x256 images (the super-resolution UNet's size) from ``prompt``.

        Args:
            prompt: a str or a list of str; or None with ``text_model_output``.
            num_images_per_prompt: images per prompt.
            prior_num_inference_steps, decoder_num_inference_steps, super_res_num_inference_steps: steps of
                each stage (at least 2 each).
            generator: a torch.Generator (or a list, one per image) for every random draw.
            prior_latents, decoder_latents, super_res_latents: each stage's start noise instead of drawing it.
            text_model_output: the CLIP text model's output (text_embeds, last_hidden_state) instead of a
                prompt, with ``text_attention_mask``.
            prior_guidance_scale, decoder_guidance_scale: classifier-free guidance of the prior and the
                decoder; both stages are guided when either is above 1.
            output_type: "pil", "np" or "pt".
            return_dict: return an :class:`ImagePipelineOutput` rather than ``(images,)``.
        """
        if prompt is not None and not (isinstance(prompt, str) or
                                       (isinstance(prompt, list) and prompt and all(isinstance(p, str)
                                                                                    for p in prompt))):
            raise ValueError(f"prompt must be a str or a non-empty list of str; got {prompt!r}")
        if (prompt is None) == (text_model_output is None):
            raise ValueError("pass a prompt or text_model_output (not both)")
        if text_model_output is not None and text_attention_mask is None:
            raise ValueError("text_model_output needs its text_attention_mask")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int; got {num_images_per_prompt!r}")
        check_steps(prior_num_inference_steps=prior_num_inference_steps,
                    decoder_num_inference_steps=decoder_num_inference_steps,
                    super_res_num_inference_steps=super_res_num_inference_steps)
        prior_scale = check_scale("prior_guidance_scale", prior_guidance_scale)
        decoder_scale = check_scale("decoder_guidance_scale", decoder_guidance_scale)
        output_type = self._check_output_type(output_type)
        device = self.device
        guided = prior_scale > 1.0 or decoder_scale > 1.0

        # 1. text conditions: [""; prompt] under guidance
        given = None
        if text_model_output is not None:
            given = (text_model_output[0].to(device), text_model_output[1].to(device),
                     text_attention_mask.bool().to(device))
        texts = None if prompt is None else ([prompt] if isinstance(prompt, str) else list(prompt))
        prompt_embeds, text_states, text_mask = self._text_conditions(texts, device, num_images_per_prompt, guided,
                                                                      given)
        batch = prompt_embeds.shape[0] // (2 if guided else 1)

        # 2. prior, 3. decoder, 4. super-resolution
        image_embeddings = self._prior(prompt_embeds, text_states, text_mask, batch, guided=guided,
                                       guidance_scale=prior_scale, num_inference_steps=prior_num_inference_steps,
                                       generator=generator, latents=prior_latents)
        image_small = self._decode(image_embeddings, prompt_embeds, text_states, text_mask, guided=guided,
                                   guidance_scale=decoder_scale, num_inference_steps=decoder_num_inference_steps,
                                   generator=generator, latents=decoder_latents)
        image = self._super_resolve(image_small, num_inference_steps=super_res_num_inference_steps,
                                    generator=generator, latents=super_res_latents)
        return self._output(image, output_type, return_dict)
