"""unCLIP image variations (DALL-E 2, Ramesh et al. 2022, arXiv:2204.06125, sec. 3.1): new images of an image's CLIP embedding.

    e_img    = CLIPVision(feature_extractor(image)).image_embeds      (B, D), repeated per image
    y, c, m  = CLIP("") text embedding, token states, mask           [""; ""] under guidance
    image    = decoder (64x64) -> super-resolution (256x256)        :mod:`.unclip_stages`

No prior: the decoder is conditioned on the input image's own CLIP embedding (or
``image_embeddings``) and an empty prompt. Components (the CLIP vision encoder with projection and
its ``CLIPImageProcessor`` come from ``transformers``), ``model_index.json`` and the call's arguments
are diffusers 0.42.1's ``UnCLIPImageVariationPipeline``'s; a seeded CPU run gives diffusers' images.

Differences from diffusers: bad input (neither or both of image and ``image_embeddings``, step
counts below 2, an unknown ``output_type``, ``image_embeddings`` that are not (B, D)) raises ValueError
before any work; passed latents are checked to have the stage's shape (diffusers does not check them);
``output_type="pt"`` returns a tensor in [0, 1]; ``"numpy"`` is read as ``"np"``.
"""

from __future__ import annotations

from typing import Any

import PIL.Image
import torch

from ..utils.torch_utils import Generator
from .pipeline_utils import ImagePipelineOutput
from .unclip_stages import UnCLIPStages, check_scale, check_steps


class UnCLIPImageVariationPipeline(UnCLIPStages):
    """Image variations with unCLIP: CLIP image embedding -> decoder -> two super-resolution UNets."""

    def __init__(self, decoder: Any, text_encoder: Any, tokenizer: Any, text_proj: Any, feature_extractor: Any,
                 image_encoder: Any, super_res_first: Any, super_res_last: Any, decoder_scheduler: Any,
                 super_res_scheduler: Any) -> None:
        super().__init__()
        self.register_modules(decoder=decoder, text_encoder=text_encoder, tokenizer=tokenizer, text_proj=text_proj,
                              feature_extractor=feature_extractor, image_encoder=image_encoder,
                              super_res_first=super_res_first, super_res_last=super_res_last,
                              decoder_scheduler=decoder_scheduler, super_res_scheduler=super_res_scheduler)

    def _image_embeddings(self, image: Any, image_embeddings: torch.Tensor | None,
                          num_images_per_prompt: int) -> torch.Tensor:
        """(B * n, D) CLIP image embeddings of ``image`` (PIL images or pixel values), or the ones given."""
        if image_embeddings is None:
            dtype = next(self.image_encoder.parameters()).dtype
            if not isinstance(image, torch.Tensor):
                image = self.feature_extractor(images=image, return_tensors="pt").pixel_values
            image_embeddings = self.image_encoder(image.to(device=self.device, dtype=dtype)).image_embeds
        return image_embeddings.repeat_interleave(num_images_per_prompt, dim=0)

    @torch.no_grad()
    def __call__(self, image: PIL.Image.Image | list[PIL.Image.Image] | torch.Tensor | None = None,
                 num_images_per_prompt: int = 1, decoder_num_inference_steps: int = 25,
                 super_res_num_inference_steps: int = 7, generator: Generator = None,
                 decoder_latents: torch.Tensor | None = None, super_res_latents: torch.Tensor | None = None,
                 image_embeddings: torch.Tensor | None = None, decoder_guidance_scale: float = 8.0,
                 output_type: str = "pil", return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """Generate 256x256 variations of ``image``.

        Args:
            image: a PIL image, a list of them, or (B, 3, H, W) pixel values the image encoder takes;
                or None with ``image_embeddings`` (B, D).
            num_images_per_prompt: variations per image.
            decoder_num_inference_steps, super_res_num_inference_steps: steps of each stage (at least 2).
            generator: a torch.Generator (or a list, one per image) for every random draw.
            decoder_latents, super_res_latents: each stage's start noise instead of drawing it.
            decoder_guidance_scale: classifier-free guidance of the decoder (above 1 turns it on).
            output_type: "pil", "np" or "pt".
            return_dict: return an :class:`ImagePipelineOutput` rather than ``(images,)``.
        """
        if (image is None) == (image_embeddings is None):
            raise ValueError("pass an image or image_embeddings (not both)")
        if image is not None and not (isinstance(image, (PIL.Image.Image, torch.Tensor))
                                      or (isinstance(image, list) and image
                                          and all(isinstance(i, PIL.Image.Image) for i in image))):
            raise ValueError(f"image must be a PIL image, a list of them or a tensor; got {type(image).__name__}")
        if image_embeddings is not None and (not isinstance(image_embeddings, torch.Tensor)
                                             or image_embeddings.dim() != 2):
            got = tuple(image_embeddings.shape) if isinstance(image_embeddings, torch.Tensor) else image_embeddings
            raise ValueError(f"image_embeddings must be a (B, D) tensor; got {got}")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int; got {num_images_per_prompt!r}")
        check_steps(decoder_num_inference_steps=decoder_num_inference_steps,
                    super_res_num_inference_steps=super_res_num_inference_steps)
        decoder_scale = check_scale("decoder_guidance_scale", decoder_guidance_scale)
        output_type = self._check_output_type(output_type)
        guided = decoder_scale > 1.0
        if image is not None:
            count = 1 if isinstance(image, PIL.Image.Image) else len(image) if isinstance(image, list) \
                else image.shape[0]
        else:
            count = image_embeddings.shape[0]

        # 1. an empty prompt's text conditions, 2. the image's CLIP embedding
        prompt_embeds, text_states, text_mask = self._text_conditions([""] * count, self.device,
                                                                      num_images_per_prompt, guided)
        embeddings = self._image_embeddings(image, image_embeddings, num_images_per_prompt)

        # 3. decoder, 4. super-resolution
        image_small = self._decode(embeddings, prompt_embeds, text_states, text_mask, guided=guided,
                                   guidance_scale=decoder_scale, num_inference_steps=decoder_num_inference_steps,
                                   generator=generator, latents=decoder_latents)
        result = self._super_resolve(image_small, num_inference_steps=super_res_num_inference_steps,
                                     generator=generator, latents=super_res_latents)
        return self._output(result, output_type, return_dict)
