"""Stable Diffusion text-to-image (Rombach et al. 2022): latent diffusion conditioned on CLIP text embeddings.

    c = CLIP(prompt), c0 = CLIP(negative prompt or "")            (B * n, 77, D)
    z_T ~ N(0, I) * init_noise_sigma                              (B * n, 4, H / f, W / f)
    eps = unet([z_t, z_t], t, [c0, c]); eps = eps0 + w (eps_c - eps0)   classifier-free guidance, w > 1
    z_{t-1} = scheduler.step(eps, t, z_t)
    image = vae.decode(z_0 / scaling_factor)

:class:`StableDiffusionBase` holds what the text-to-image, img2img and inpainting pipelines share:
the components, diffusers' scheduler-config fixes, prompt encoding, the denoising loop with its
per-step callback, and decoding. The pipelines load any diffusers Stable Diffusion directory
(``StableDiffusionImg2ImgPipeline.from_pretrained(text_to_image_dir)`` works) and draw their random
numbers as diffusers' do, so a seeded CPU run gives diffusers' images (DESIGN.md, decision 5).

Safety checker: fusediff has none. A directory that names one loads it as None with a warning
(see ``DiffusionPipeline.from_pretrained``); a checker object passed to the constructor (e.g.
diffusers' ``StableDiffusionSafetyChecker`` with its feature extractor) is run as diffusers runs it.
Left out: LoRA, textual inversion, IP-Adapter, ``cross_attention_kwargs``, the deprecated
``callback``/``callback_steps`` arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..utils.outputs import BaseOutput
from ..utils.torch_utils import Generator
from ..sampling import Guidance, Timesteps, denoise, initial_noise, module_memory_format, set_timesteps
from . import text_conditioning as tc
from .pipeline_utils import DiffusionPipeline, GuidedCallState, check_callback_tensor_inputs

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StableDiffusionPipelineOutput(BaseOutput):
    """Images, and per image whether a safety checker flagged it (None when no checker ran)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None = None


def _fixed_scheduler(scheduler: Any, **wanted: Any) -> Any:
    """The scheduler rebuilt with config values diffusers' Stable Diffusion pipelines force (old configs)."""
    config = getattr(scheduler, "config", None)
    if config is None:
        return scheduler
    changes = {k: v for k, v in wanted.items() if k in config and config[k] != v}
    if not changes:
        return scheduler
    logger.warning("%s config: using %s as diffusers' Stable Diffusion pipelines do (the stored config is outdated)",
                   type(scheduler).__name__, ", ".join(f"{k}={v}" for k, v in changes.items()))
    return type(scheduler).from_config(config, **changes)


def text_unet_prediction(unet: Any, x: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor,
                         timestep_cond: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                         masked_image_latents: torch.Tensor | None = None) -> torch.Tensor:
    """The UNet's output for latents x at t given text embeddings; an inpainting UNet also gets the
    mask and the masked image's latents as extra input channels."""
    if mask is not None:
        x = torch.cat([x, mask, masked_image_latents], dim=1)
    extra = {"timestep_cond": timestep_cond} if timestep_cond is not None else {}
    return unet(x, t, encoder_hidden_states=prompt_embeds, **extra).sample


class StableDiffusionBase(GuidedCallState, DiffusionPipeline):
    """Components and the shared machinery of the Stable Diffusion pipelines (not used directly)."""

    _config_arguments = ("requires_safety_checker",)
    # components fusediff does not implement: an entry naming one loads as None, with a warning
    _unsupported_components = ("safety_checker", "feature_extractor", "image_encoder")
    _callback_tensor_inputs: tuple[str, ...] = ("latents", "prompt_embeds", "negative_prompt_embeds")
    _scheduler_fixes: dict[str, Any] = {"steps_offset": 1, "clip_sample": False}

    def __init__(self, vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, scheduler: Any,
                 safety_checker: Any = None, feature_extractor: Any = None, image_encoder: Any = None,
                 requires_safety_checker: bool = True) -> None:
        super().__init__()
        scheduler = _fixed_scheduler(scheduler, **self._scheduler_fixes)
        if safety_checker is None and requires_safety_checker:
            logger.warning("%s runs without a safety checker: generated images are not filtered. Abide by the "
                           "model's license; pass requires_safety_checker=False to silence this.", type(self).__name__)
        if safety_checker is not None and feature_extractor is None:
            raise ValueError("a safety_checker needs its feature_extractor; pass both, or safety_checker=None")
        if image_encoder is not None:
            logger.warning("%s: image_encoder (IP-Adapter) is not supported by fusediff and is not used",
                           type(self).__name__)
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              safety_checker=safety_checker, feature_extractor=feature_extractor,
                              image_encoder=image_encoder)
        self.register_to_config(requires_safety_checker=bool(requires_safety_checker))
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8

    # -- state readable from a callback, as in diffusers (GuidedCallState) ----------------------
    @property
    def do_classifier_free_guidance(self) -> bool:
        """Guidance runs for a scale above 1, unless the UNet was distilled with the scale as input."""
        return self._guidance_scale > 1 and self.unet.config.get("time_cond_proj_dim") is None

    # -- sizes and inputs --------------------------------------------------------------------
    def default_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the UNet's sample size."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    def check_common(self, prompt: Any, negative_prompt: Any, prompt_embeds: torch.Tensor | None,
                     negative_prompt_embeds: torch.Tensor | None, num_images_per_prompt: int, output_type: str,
                     callback_on_step_end_tensor_inputs: Sequence[str]) -> None:
        tc.check_prompts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int; got {num_images_per_prompt!r}")
        tc.check_output_type(output_type)
        check_callback_tensor_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)

    # -- prompts -----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[str] | None, device: torch.device, num_images_per_prompt: int,
                      do_classifier_free_guidance: bool, negative_prompt: str | list[str] | None = None,
                      prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                      clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt embeddings, negative ones or None), each (B * num_images_per_prompt, S, D)."""
        use_mask = bool(getattr(getattr(self.text_encoder, "config", None), "use_attention_mask", False))
        max_length = self.tokenizer.model_max_length if self.tokenizer is not None else None
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        return tc.encode_prompts(self.tokenizer, self.text_encoder, prompt, device, num_images_per_prompt,
                                 do_classifier_free_guidance, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                 max_length=max_length, dtype=dtype, use_attention_mask=use_mask, clip_skip=clip_skip)

    def _conditioning(self, prompt: Any, negative_prompt: Any, prompt_embeds: torch.Tensor | None,
                      negative_prompt_embeds: torch.Tensor | None, num_images_per_prompt: int,
                      clip_skip: int | None, guidance_scale: float) -> tuple[int, dict[str, torch.Tensor | None]]:
        """The call's batch (prompts x images per prompt) and the loop's tensors: prompt_embeds holds
        [negative; positive] when guidance is on (``guidance_scale`` > 1, recorded here)."""
        self._guidance_scale = guidance_scale
        batch = tc.batch_size_of(prompt, prompt_embeds) * num_images_per_prompt
        positive, negative = self.encode_prompt(prompt, self.device, num_images_per_prompt,
                                                self.do_classifier_free_guidance, negative_prompt,
                                                prompt_embeds, negative_prompt_embeds, clip_skip)
        combined = torch.cat([negative, positive]) if self.do_classifier_free_guidance else positive
        return batch, {"prompt_embeds": combined, "negative_prompt_embeds": negative}

    def _timestep_cond(self, batch: int, dtype: torch.dtype) -> torch.Tensor | None:
        dim = self.unet.config.get("time_cond_proj_dim")
        if dim is None:
            return None
        w = torch.tensor(self._guidance_scale - 1).repeat(batch)
        return tc.guidance_scale_embedding(w, dim).to(device=self.device, dtype=dtype)

    # -- the denoising loop ------------------------------------------------------------------
    def _denoise(self, noise: torch.Tensor, run: Timesteps, conditioning: dict[str, torch.Tensor | None], *,
                 generator: Generator, eta: float, guidance_rescale: float = 0.0,
                 callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                 image_latents: torch.Tensor | None = None, start_from_noise: bool | None = None,
                 mask: torch.Tensor | None = None, model_inputs: dict[str, torch.Tensor] | None = None,
                 callback_tensors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """:func:`fusediff.sampling.denoise` over ``run`` with the UNet, guidance and the call's callback;
        returns the final latents. ``conditioning`` is :meth:`_conditioning`'s; ``model_inputs`` are more
        UNet inputs (inpainting's mask channels), ``callback_tensors`` more tensors a callback may read."""
        self._num_timesteps = len(run)
        guidance = Guidance(self._guidance_scale, guidance_rescale) if self.do_classifier_free_guidance else None
        model_kwargs = {"prompt_embeds": conditioning["prompt_embeds"],
                        "timestep_cond": self._timestep_cond(noise.shape[0], noise.dtype), **(model_inputs or {})}
        return denoise(self.scheduler, functools.partial(text_unet_prediction, self.unet), noise, timesteps=run,
                       model_kwargs=model_kwargs, guidance=guidance, generator=generator, eta=eta,
                       image_latents=image_latents, start_from_noise=start_from_noise, mask=mask,
                       callback_on_step_end=callback_on_step_end,
                       callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                       callback_tensors={"negative_prompt_embeds": conditioning["negative_prompt_embeds"],
                                         **(callback_tensors or {})},
                       pipeline=self, progress=self.progress_bar,
                       cuda_graph=self.model_call_graphs("unet step", self.unet),
                       memory_format=module_memory_format(self.unet))

    # -- decoding ----------------------------------------------------------------------------
    def run_safety_checker(self, image: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, list[bool] | None]:
        if self.safety_checker is None:
            return image, None
        pil = tc.postprocess(image, "pil")
        features = self.feature_extractor(pil, return_tensors="pt").to(self.device)
        return self.safety_checker(images=image, clip_input=features.pixel_values.to(dtype))

    def _finish(self, latents: torch.Tensor, output_type: str, dtype: torch.dtype,
                return_dict: bool) -> StableDiffusionPipelineOutput | tuple:
        nsfw = None
        if output_type == "latent":
            image = latents
        else:
            image = tc.decode_latents(self.vae, latents.to(self.vae.dtype))
            image, nsfw = self.run_safety_checker(image, dtype)
        flags = None if nsfw is None else [not flagged for flagged in nsfw]
        images = tc.postprocess(image, output_type, do_denormalize=flags)
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw) if return_dict \
            else (images, nsfw)


class StableDiffusionPipeline(StableDiffusionBase):
    """Text-to-image generation with Stable Diffusion (v1/v2 layout: CLIP text encoder, UNet, KL VAE)."""

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, timesteps: Sequence[int] | None = None,
                 sigmas: Sequence[float] | None = None, guidance_scale: float = 7.5,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator: Generator = None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, guidance_rescale: float = 0.0,
                 clip_skip: int | None = None,
                 callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                 ) -> StableDiffusionPipelineOutput | tuple:
        """Generate ``num_images_per_prompt`` images per prompt.

        Args:
            prompt, negative_prompt: text(s) to follow and to steer away from (str or list of str);
                or pass ``prompt_embeds`` / ``negative_prompt_embeds`` directly.
            height, width: image size in pixels, multiples of 8 (default: the UNet's sample size
                times the VAE's down-sampling factor).
            num_inference_steps, timesteps, sigmas: the schedule (custom timesteps or sigmas if the
                scheduler takes them).
            guidance_scale: classifier-free guidance weight w; guidance runs for w > 1.
            eta: DDIM's noise weight (ignored by schedulers without one).
            generator: one torch.Generator, or one per image; latents: x_T to start from.
            output_type: "pil", "np", "pt" or "latent".
            guidance_rescale: phi of Lin et al. 2024 (eq. 16); clip_skip: CLIP layers to skip.
            callback_on_step_end: called as ``f(pipe, i, t, {name: tensor})`` after each step with
                the tensors named in ``callback_on_step_end_tensor_inputs``; may return replacements.
        """
        height, width = tc.image_size(height, width, self.default_size(), max(8, self.vae_scale_factor))
        self.check_common(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
                          output_type, callback_on_step_end_tensor_inputs)
        # 1. text embeddings: [c0; c] under guidance
        batch, state = self._conditioning(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                          num_images_per_prompt, clip_skip, guidance_scale)
        # 2. timesteps, x_T ~ N(0, I) (or the given latents), 3. denoise, 4. decode
        run = set_timesteps(self.scheduler, num_inference_steps, timesteps=timesteps, sigmas=sigmas)
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        dtype = state["prompt_embeds"].dtype
        noise = initial_noise(shape, generator, self.device, dtype, latents)
        latents = self._denoise(noise, run, state, generator=generator, eta=eta, guidance_rescale=guidance_rescale,
                                callback_on_step_end=callback_on_step_end,
                                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        return self._finish(latents, output_type, dtype, return_dict)
