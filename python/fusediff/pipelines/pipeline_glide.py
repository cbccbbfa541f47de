"""GLIDE (Nichol et al. 2021, arXiv:2112.10741): text to a 64 x 64 image, and text-guided inpainting.

    ids, mask = BPE(lower(prompt)) padded to 128; uncond = all padding     (glide-text2im's tokenizer)
    proj, c = text_encoder(ids, mask)                                      rows [cond; uncond] under guidance
    x_T ~ N(0, I)                                                          (B * n, 3, 64, 64), pixels
    [eps | v] = unet([x_t (, image * keep, keep)], t, c, class_labels=proj)
    eps = eps_u + w (eps_c - eps_u); v = v_c                               guidance on eps only (Sec. 3.3)
    eps = (x_t - sqrt(abar_t) image) / sqrt(1 - abar_t) where keep = 1     inpainting: x0 known there
    x_{t-1} = DDPM step(x_t, [eps | v])                                    learned-range variance, x0 clipped
    image = (x_0 + 1) / 2

The loop is :func:`fusediff.sampling.denoise` with the pipeline's DDPMScheduler on glide-text2im's
respaced timesteps (``timestep_respacing``: "100" by default, as its notebooks; see
:mod:`.glide_common` for why the scheduler's steps are the respaced diffusion's). Components:
``tokenizer`` (transformers' GPT2Tokenizer of GLIDE's vocabulary; None if only token ids are passed),
``text_encoder`` (:class:`~fusediff.GlideTextEncoder`), ``unet`` (:class:`~fusediff.UNet2DConditionModel`,
3 input channels, or 7 for inpainting) and ``scheduler``. ``fusediff convert glide`` writes them.

Random draws: x_T, then the scheduler's step noise (B * n rows each), from ``generator``. glide-text2im's
notebooks draw from the global generator and for all 2 B guided rows (the uncond half's are thrown away),
so a seed does not give their images; the same noise does (tests/pipelines/test_glide.py).
Differences from glide-text2im kept on purpose: guidance runs only for ``guidance_scale`` > 1 (as in
diffusers; at 1 the result is the conditional model's, which glide-text2im computes at twice the cost),
a ``negative_prompt`` may replace the empty unconditional text, and masks follow diffusers (1 = repaint;
glide-text2im's ``inpaint_mask`` is 1 = keep).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..sampling import Guidance, denoise, initial_noise, module_memory_format, set_timesteps
from ..utils.torch_utils import Generator
from . import pipeline_utils
from .glide_common import glide_prediction, mask_tensor, space_timesteps, tokens_and_mask
from .pipeline_if_images import if_image_tensor
from .pipeline_utils import ImagePipelineOutput, check_callback_tensor_inputs


class GlideBase(pipeline_utils.GuidedCallState, pipeline_utils.DiffusionPipeline):
    """Components and the shared machinery of the GLIDE pipelines (not used directly)."""

    _callback_tensor_inputs: tuple[str, ...] = ("latents",)
    default_respacing = "100"
    inpaint = False
    super_res = False

    def __init__(self, tokenizer: Any, text_encoder: Any, unet: Any, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler)

    # -- checks ----------------------------------------------------------------------------------
    def expected_in_channels(self) -> int:
        return 3 * (1 + self.super_res + self.inpaint) + self.inpaint

    def check_components(self) -> None:
        want = self.expected_in_channels()
        if self.unet.config.in_channels != want:
            raise ValueError(f"{type(self).__name__} needs a UNet of {want} input channels; this one takes "
                             f"{self.unet.config.in_channels} (convert the matching GLIDE checkpoint kind)")
        if self.unet.config.out_channels != 6:
            raise ValueError(f"a GLIDE UNet outputs eps and the variance (6 channels); got "
                             f"{self.unet.config.out_channels}")

    def texts(self, prompt: str | list[str] | None, negative_prompt: str | list[str] | None) -> tuple[list, list]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt):
            raise ValueError(f"prompt must be a str or a non-empty list of str; got {prompt!r}")
        negative = negative_prompt if negative_prompt is not None else ""
        negative = [negative] * len(prompt) if isinstance(negative, str) else negative
        if not isinstance(negative, list) or len(negative) != len(prompt) or \
                not all(isinstance(n, str) for n in negative):
            raise ValueError(f"negative_prompt must be a str or a list of {len(prompt)} str; got {negative_prompt!r}")
        return prompt, negative

    def run_timesteps(self, timestep_respacing: str | int | None, num_inference_steps: int | None,
                      timesteps: Sequence[int] | None) -> Any:
        """The scheduler's run on custom ``timesteps``, or on glide-text2im's respacing of its trained chain."""
        given = [n for n, v in (("timestep_respacing", timestep_respacing), ("num_inference_steps",
                 num_inference_steps), ("timesteps", timesteps)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"pass one of timestep_respacing, num_inference_steps and timesteps; got {given}")
        if timesteps is None:
            spacing = num_inference_steps if num_inference_steps is not None else \
                timestep_respacing if timestep_respacing is not None else self.default_respacing
            timesteps = space_timesteps(self.scheduler.config.num_train_timesteps, spacing)
        return set_timesteps(self.scheduler, None, timesteps=timesteps)

    # -- text ------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: list[str], negative: list[str], num_images_per_prompt: int, guided: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(text_embeds, text_states) per row: the B * n conditional rows, then (guided) B * n unconditional."""
        if self.tokenizer is None:
            raise ValueError("this pipeline has no tokenizer: load one (transformers' GPT2Tokenizer of GLIDE's "
                             "vocabulary) with tokenizer=..., or convert with --tokenizer")
        config = self.text_encoder.config
        texts = list(prompt) + (list(negative) if guided else [])
        ids, mask = tokens_and_mask(self.tokenizer, texts, config.text_ctx, self.text_encoder.pad_token_id)
        ids, mask = ids.repeat_interleave(num_images_per_prompt, 0), mask.repeat_interleave(num_images_per_prompt, 0)
        out = self.text_encoder(ids.to(self.device), mask.to(self.device))
        return out.text_embeds.to(self.unet.dtype), out.last_hidden_state.to(self.unet.dtype)

    def images_for(self, image: Any, batch: int, n: int, size: tuple[int, int], what: str,
                   mask: bool = False) -> torch.Tensor:
        """One image (or mask) per prompt, or one for all, repeated per image, on the device: (B * n, C, H, W)."""
        x = mask_tensor(image) if mask else if_image_tensor(image)
        channels = 1 if mask else 3
        if x.shape[1] != channels:
            raise ValueError(f"{what} must have {channels} channels; got shape {tuple(x.shape)}")
        if x.shape[0] not in (1, batch):
            raise ValueError(f"got {x.shape[0]} {what}s for {batch} prompts; pass one, or one per prompt")
        if tuple(x.shape[-2:]) != tuple(size):
            raise ValueError(f"{what} is {tuple(x.shape[-2:])}; this stage needs {tuple(size)}")
        x = x.expand(batch, -1, -1, -1).repeat_interleave(n, 0)
        return x.to(device=self.device, dtype=self.unet.dtype)

    # -- the loop --------------------------------------------------------------------------------
    def _sample(self, prompt: Any, negative_prompt: Any, num_images_per_prompt: int, guidance_scale: float,
                size: tuple[int, int], run: Any, generator: Generator, latents: torch.Tensor | None,
                noise_scale: float, conditioning: torch.Tensor | None, known: torch.Tensor | None,
                keep: torch.Tensor | None, callback_on_step_end: Callable[..., Any] | None,
                callback_on_step_end_tensor_inputs: Sequence[str]) -> torch.Tensor:
        check_callback_tensor_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        self._guidance_scale = float(guidance_scale)
        guided = self.do_classifier_free_guidance
        prompt, negative = self.texts(prompt, negative_prompt)
        text_embeds, text_states = self.encode_prompt(prompt, negative, num_images_per_prompt, guided)
        rows = len(prompt) * num_images_per_prompt
        noise = initial_noise((rows, 3, *size), generator, self.device, self.unet.dtype, latents)
        if noise_scale != 1.0:
            noise = noise * noise_scale  # the upsampler's temperature (glide-text2im: randn * upsample_temp)
        both = (lambda v: None if v is None else torch.cat([v, v])) if guided else (lambda v: v)
        kwargs = {"text_embeds": text_embeds, "text_states": text_states, "conditioning": both(conditioning),
                  "known": both(known), "keep": both(keep)}
        if keep is not None:
            kwargs["alphas_cumprod"] = self.scheduler.alphas_cumprod.to(self.device)
        self._num_timesteps = len(run)
        predict = functools.partial(glide_prediction, self.unet, guided=guided)
        return denoise(self.scheduler, predict, noise, timesteps=run,
                       model_kwargs={k: v for k, v in kwargs.items() if v is not None},
                       guidance=Guidance(self._guidance_scale, uncond_first=False) if guided else None,
                       generator=generator, callback_on_step_end=callback_on_step_end,
                       callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, pipeline=self,
                       progress=self.progress_bar, cuda_graph=self.model_call_graphs("unet step", self.unet),
                       memory_format=module_memory_format(self.unet))

    @staticmethod
    def _finish(image: torch.Tensor, output_type: str, return_dict: bool) -> ImagePipelineOutput | tuple:
        """"pt": the sample in [-1, 1] (what the upsampler takes); "np" / "pil": images in [0, 1]."""
        pipeline_utils.check_output_type(output_type)
        images = image if output_type == "pt" else pipeline_utils.postprocess_images(image, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    @staticmethod
    def check_count(num_images_per_prompt: Any) -> None:
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int; got {num_images_per_prompt!r}")

    def default_size(self) -> tuple[int, int]:
        size = self.unet.config.sample_size
        return (size, size) if isinstance(size, int) else tuple(size)


class GlidePipeline(GlideBase):
    """GLIDE's base model: text to a 64 x 64 image, with classifier-free guidance."""

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_images_per_prompt: int = 1, guidance_scale: float = 3.0,
                 negative_prompt: str | list[str] | None = None, timestep_respacing: str | int | None = None,
                 num_inference_steps: int | None = None, timesteps: Sequence[int] | None = None,
                 generator: Generator = None, latents: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, callback_on_step_end: Callable[..., Any] | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)) -> ImagePipelineOutput | tuple:
        """Generate ``num_images_per_prompt`` images per prompt.

        Args:
            prompt, negative_prompt: the text(s); the unconditional text is empty (glide-text2im's) unless
                ``negative_prompt`` is given.
            guidance_scale: w of eps_u + w (eps_c - eps_u) (3.0 in glide-text2im's notebook); guided above 1.
            timestep_respacing: glide-text2im's respacing string ("100", "fast27", "ddim50", "10,10,3");
                or ``num_inference_steps`` (N, the same as "N") or descending custom ``timesteps``.
            generator, latents: the random source, or x_T itself ((B * n, 3, 64, 64)).
            output_type: "pil", "np" (images in [0, 1]) or "pt" (the sample in [-1, 1]).
            callback_on_step_end: ``f(pipe, i, t, {"latents": x})`` after each step (diffusers' semantics).
        """
        self.check_components()
        self.check_count(num_images_per_prompt)
        pipeline_utils.check_output_type(output_type)
        run = self.run_timesteps(timestep_respacing, num_inference_steps, timesteps)
        x = self._sample(prompt, negative_prompt, num_images_per_prompt, guidance_scale, self.default_size(), run,
                         generator, latents, 1.0, None, None, None, callback_on_step_end,
                         callback_on_step_end_tensor_inputs)
        return self._finish(x, output_type, return_dict)


class GlideInpaintPipeline(GlideBase):
    """GLIDE's inpainting base model: repaint the masked part of a 64 x 64 image following the text."""

    inpaint = True

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], image: Any, mask_image: Any, num_images_per_prompt: int = 1,
                 guidance_scale: float = 5.0, negative_prompt: str | list[str] | None = None,
                 timestep_respacing: str | int | None = None, num_inference_steps: int | None = None,
                 timesteps: Sequence[int] | None = None, generator: Generator = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                 callback_on_step_end: Callable[..., Any] | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)) -> ImagePipelineOutput | tuple:
        """Inpaint ``image`` (PIL, or arrays/tensors in [-1, 1]; one, or one per prompt; the UNet's size)
        where ``mask_image`` is 1 (diffusers' convention: white = repaint). ``guidance_scale`` defaults to
        5.0 (glide-text2im's inpainting notebook); other arguments as :meth:`GlidePipeline.__call__`."""
        self.check_components()
        self.check_count(num_images_per_prompt)
        pipeline_utils.check_output_type(output_type)
        run = self.run_timesteps(timestep_respacing, num_inference_steps, timesteps)
        size = self.default_size()
        batch = len(self.texts(prompt, negative_prompt)[0])
        source = self.images_for(image, batch, num_images_per_prompt, size, "image")
        keep = 1 - self.images_for(mask_image, batch, num_images_per_prompt, size, "mask_image", mask=True)
        conditioning = torch.cat([source * keep, keep], dim=1)
        x = self._sample(prompt, negative_prompt, num_images_per_prompt, guidance_scale, size, run, generator,
                         latents, 1.0, conditioning, source, keep, callback_on_step_end,
                         callback_on_step_end_tensor_inputs)
        return self._finish(x, output_type, return_dict)
