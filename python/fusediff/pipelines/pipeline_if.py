"""DeepFloyd IF stage I (Saharia et al. 2022, Imagen's cascade): pixel-space diffusion conditioned on T5 text.

    c = T5(lower(prompt)), c0 = T5(lower(negative prompt or ""))      (B * n, 77, D), with the attention mask
    x_T ~ N(0, I) * init_noise_sigma                                   (B * n, 3, H, W), pixels
    [eps | v] = unet([x_t, x_t], t, [c0, c])                            eps and the learned-range variance v
    eps = eps0 + w (eps_c - eps0); v = v_c                              guidance on eps only, w > 1
    x_{t-1} = DDPM step(x_t, [eps | v])                                 learned-range variance, dynamic thresholding
    image = (x_0 + 1) / 2

:class:`IFBase` holds what the three IF pipelines share (components, prompt encoding, the call to
:func:`fusediff.sampling.denoise`, outputs); :class:`IFPipeline` is stage I, text to a 64 x 64 image
in the released model. img2img is :mod:`.pipeline_if_img2img`, stage II (super resolution)
:mod:`.pipeline_if_superresolution`. A seeded CPU run gives diffusers 0.42.1's images (DESIGN.md,
decision 5): the random draws come in its order, and guidance leaves the conditional half's
variance, as diffusers' IF pipelines do (the unconditional half's variance channels are replaced by
the conditional half's before the loop's guidance, which then returns them unchanged).

Skipped components: diffusers' ``IFSafetyChecker``, its ``CLIPImageProcessor`` feature extractor and
the ``IFWatermarker``. A ``model_index.json`` that names them loads them as None with a logged
warning (as the Stable Diffusion pipelines load a safety checker); objects passed to the constructor
are not used (a warning says so) and the pipeline holds None.

Deliberate differences from diffusers (each pinned by a test in tests/pipelines/test_if*.py):
- ``clean_caption`` defaults to False and True raises NotImplementedError (diffusers defaults to
  True, cleans captions with bs4 and ftfy when installed, and falls back to False with a warning
  when they are not). Texts are lower-cased and stripped as diffusers does without cleaning.
- No ``cross_attention_kwargs``, LoRA or CPU offload. ``callback`` / ``callback_steps`` work as in
  diffusers; ``callback_on_step_end`` (the SD pipelines' per-step callback) is accepted too.
- Another scheduler swapped in (``DDIMScheduler.from_config(pipe.scheduler.config)``) gets the eps
  channels only: its config keeps IF's ``variance_type``, on which diffusers passes the variance
  channels too and the step fails on the shapes.
- Bad input raises before any work: sizes that are no multiple of the UNet's down-sampling factor,
  a non-positive ``num_images_per_prompt``, an unknown ``output_type`` (diffusers fails inside the
  UNet, or returns numpy for any unknown type), a prompt without a text encoder.
Like diffusers: ``output_type="pt"`` returns the raw (B, 3, H, W) sample in [-1, 1] (what stage II
takes), ``"np"`` / ``"pil"`` images in [0, 1]; the output's ``nsfw_detected`` and
``watermark_detected`` are None.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..sampling import Guidance, Timesteps, denoise, initial_noise, module_memory_format, set_timesteps
from ..utils.outputs import BaseOutput
from ..utils.torch_utils import Generator
from . import pipeline_utils
from . import text_conditioning as tc

logger = logging.getLogger(__name__)

MAX_LENGTH = 77  # IF's T5 was trained on 77 tokens (diffusers' IF pipelines fix it)
LEARNED_VARIANCES = ("learned", "learned_range")
Callback = Callable[[int, Any, torch.Tensor], None]


@dataclasses.dataclass
class IFPipelineOutput(BaseOutput):
    """Images; the safety flags are None (fusediff runs no IF safety checker or watermark detector)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_detected: list[bool] | None = None
    watermark_detected: list[bool] | None = None


def preprocess_text(texts: list[str]) -> list[str]:
    """IF's text preprocessing without caption cleaning: lower-case and strip each text."""
    return [t.lower().strip() for t in texts]


def if_unet_prediction(unet: Any, x: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor,
                       noise_level: torch.Tensor | None = None, upscaled: torch.Tensor | None = None, *,
                       channels: int, guided: bool, learned_variance: bool) -> torch.Tensor:
    """The IF UNet's [eps | variance] for pixels x at t (stage II: the noised upsampled image as extra
    channels, its noise level as the class label): a loop's ``predict``.

    Guided ([uncond; cond] rows), the unconditional rows get the conditional rows' variance channels,
    so the loop's guidance eps_u + w (eps_c - eps_u) returns them unchanged: diffusers guides eps only
    and keeps the conditional variance. Without a learned variance only the eps channels are returned.
    """
    if upscaled is not None:
        x = torch.cat([x, upscaled], dim=1)
    extra = {"class_labels": noise_level} if noise_level is not None else {}
    out = unet(x, t, encoder_hidden_states=prompt_embeds, **extra).sample
    if not learned_variance:
        return out[:, :channels].contiguous()
    if guided:
        uncond, cond = out.chunk(2)
        out = torch.cat([torch.cat([uncond[:, :channels], cond[:, channels:]], dim=1), cond])
    return out


def uses_learned_variance(scheduler: Any) -> bool:
    """Whether ``scheduler.step`` reads a learned variance from the model output's second half: its config
    says so and its class takes ``variance_type`` (a DDIM built from IF's DDPM config keeps the key, unused)."""
    params = inspect.signature(type(scheduler).__init__).parameters
    return "variance_type" in params and getattr(scheduler, "config", {}).get("variance_type") in LEARNED_VARIANCES


def step_callback(callback: Callback | None, callback_steps: int,
                  callback_on_step_end: Callable[..., Any] | None) -> Callable[..., Any] | None:
    """diffusers' IF ``callback(i, t, x)`` every ``callback_steps`` steps as a loop callback, or the
    ``callback_on_step_end`` given (not both)."""
    if isinstance(callback_steps, bool) or not isinstance(callback_steps, int) or callback_steps < 1:
        raise ValueError(f"callback_steps must be a positive int; got {callback_steps!r}")
    if callback is None:
        return callback_on_step_end
    if callback_on_step_end is not None:
        raise ValueError("pass callback or callback_on_step_end, not both")
    if not callable(callback):
        raise TypeError(f"callback must be callable; got {type(callback).__name__}")

    def on_step_end(pipe: Any, i: int, t: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        if i % callback_steps == 0:
            callback(i, t, tensors["latents"])
        return {}
    return on_step_end


class IFBase(pipeline_utils.GuidedCallState, pipeline_utils.DiffusionPipeline):
    """Components and shared machinery of the DeepFloyd IF pipelines (not used directly)."""

    _config_arguments = ("requires_safety_checker",)
    # diffusers' IF safety checker, its feature extractor and the watermarker: loaded as None, with a warning
    _unsupported_components = ("safety_checker", "feature_extractor", "watermarker")
    _callback_tensor_inputs: tuple[str, ...] = ("latents", "prompt_embeds", "negative_prompt_embeds")

    def __init__(self, tokenizer: Any, text_encoder: Any, unet: Any, scheduler: Any, safety_checker: Any = None,
                 feature_extractor: Any = None, watermarker: Any = None, requires_safety_checker: bool = True) -> None:
        super().__init__()
        self._register(requires_safety_checker, safety_checker, feature_extractor, watermarker,
                       tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler)

    def _register(self, requires_safety_checker: bool, safety_checker: Any, feature_extractor: Any,
                  watermarker: Any, **components: Any) -> None:
        given = [n for n, c in (("safety_checker", safety_checker), ("feature_extractor", feature_extractor),
                                ("watermarker", watermarker)) if c is not None]
        if given:
            logger.warning("%s: %s not supported by fusediff and not used", type(self).__name__, ", ".join(given))
        if requires_safety_checker:
            logger.warning("%s runs without a safety checker or watermarker: generated images are not filtered. "
                           "Abide by the IF license; pass requires_safety_checker=False to silence this.",
                           type(self).__name__)
        self.register_modules(**components, safety_checker=None, feature_extractor=None, watermarker=None)
        self.register_to_config(requires_safety_checker=bool(requires_safety_checker))

    # -- sizes and inputs ----------------------------------------------------------------------
    def size_multiple(self) -> int:
        """The UNet's down-sampling factor: image sides must be multiples of it."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    def default_size(self) -> tuple[int, int]:
        size = self.unet.config.sample_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def check_common(self, prompt: Any, negative_prompt: Any, prompt_embeds: torch.Tensor | None,
                     negative_prompt_embeds: torch.Tensor | None, num_images_per_prompt: int, output_type: str,
                     clean_caption: bool) -> None:
        tc.check_prompts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int; got {num_images_per_prompt!r}")
        pipeline_utils.check_output_type(output_type)
        if clean_caption:
            raise NotImplementedError("clean_caption=True (IF's bs4/ftfy caption cleaning) is not supported by "
                                      "fusediff; pass clean_caption=False (texts are lower-cased and stripped)")

    # -- prompts -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str] | None, do_classifier_free_guidance: bool = True,
                      num_images_per_prompt: int = 1, device: torch.device | None = None,
                      negative_prompt: str | list[str] | None = None, prompt_embeds: torch.Tensor | None = None,
                      negative_prompt_embeds: torch.Tensor | None = None, clean_caption: bool = False,
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt embeddings, negative ones or None without guidance), each (B * n, 77, D): T5's last hidden
        state of the lower-cased, stripped texts with their attention mask, as diffusers' ``encode_prompt``."""
        if clean_caption:
            raise NotImplementedError("clean_caption=True is not supported by fusediff; pass clean_caption=False")
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        positive, negative = tc.encode_prompts(
            self.tokenizer, self.text_encoder, prompt, device or self.device, num_images_per_prompt,
            do_classifier_free_guidance, negative_prompt, prompt_embeds, negative_prompt_embeds,
            max_length=MAX_LENGTH, dtype=dtype, use_attention_mask=True, preprocess=preprocess_text)
        return positive, negative if do_classifier_free_guidance else None

    def _conditioning(self, prompt: Any, negative_prompt: Any, prompt_embeds: torch.Tensor | None,
                      negative_prompt_embeds: torch.Tensor | None, num_images_per_prompt: int,
                      guidance_scale: float) -> tuple[int, dict[str, torch.Tensor | None]]:
        """The call's batch (prompts x images per prompt) and its text tensors: ``prompt_embeds`` holds
        [negative; positive] under guidance (``guidance_scale`` > 1, recorded here)."""
        self._guidance_scale = guidance_scale
        batch = tc.batch_size_of(prompt, prompt_embeds) * num_images_per_prompt
        positive, negative = self.encode_prompt(prompt, self.do_classifier_free_guidance, num_images_per_prompt,
                                                self.device, negative_prompt, prompt_embeds, negative_prompt_embeds)
        combined = torch.cat([negative, positive]) if self.do_classifier_free_guidance else positive
        return batch, {"prompt_embeds": combined, "negative_prompt_embeds": negative}

    def _doubled(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` for both halves of a guided batch ([x; x]), or x."""
        return torch.cat([x, x]) if self.do_classifier_free_guidance else x

    # -- the denoising loop --------------------------------------------------------------------
    def _denoise(self, noise: torch.Tensor, run: Timesteps, conditioning: dict[str, torch.Tensor | None], *,
                 generator: Generator, eta: float, callback: Callable[..., Any] | None,
                 callback_on_step_end_tensor_inputs: Sequence[str], image: torch.Tensor | None = None,
                 model_inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """:func:`fusediff.sampling.denoise` over ``run`` with the UNet and guidance; the final sample.
        ``image`` (img2img) is noised to the run's first timestep with ``noise``; ``model_inputs`` are more
        UNet inputs (stage II's noise level and upsampled image)."""
        pipeline_utils.check_callback_tensor_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        self._num_timesteps = len(run)
        guided = self.do_classifier_free_guidance
        learned = uses_learned_variance(self.scheduler)
        predict = functools.partial(if_unet_prediction, self.unet, channels=noise.shape[1], guided=guided,
                                    learned_variance=learned)
        return denoise(self.scheduler, predict, noise, timesteps=run,
                       model_kwargs={"prompt_embeds": conditioning["prompt_embeds"], **(model_inputs or {})},
                       guidance=Guidance(self._guidance_scale) if guided else None, generator=generator, eta=eta,
                       image_latents=image, start_from_noise=image is None, callback_on_step_end=callback,
                       callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                       callback_tensors={"negative_prompt_embeds": conditioning["negative_prompt_embeds"]},
                       pipeline=self, progress=self.progress_bar,
                       cuda_graph=self.model_call_graphs("unet step", self.unet),
                       memory_format=module_memory_format(self.unet))

    # -- outputs -------------------------------------------------------------------------------
    @staticmethod
    def _finish(image: torch.Tensor, output_type: str, return_dict: bool) -> IFPipelineOutput | tuple:
        """"pt": the sample in [-1, 1], as diffusers returns it; "np" / "pil": images in [0, 1]."""
        images = image if output_type == "pt" else pipeline_utils.postprocess_images(image, output_type)
        return IFPipelineOutput(images=images) if return_dict else (images, None, None)


class IFPipeline(IFBase):
    """DeepFloyd IF stage I: text to a low-resolution image (64 x 64 for the released IF-I models).

    Components: ``tokenizer`` / ``text_encoder`` (transformers' T5Tokenizer and T5EncoderModel; None
    when only ``prompt_embeds`` are passed), ``unet`` (a :class:`~fusediff.UNet2DConditionModel`),
    ``scheduler`` (DDPM with ``variance_type="learned_range"`` and dynamic thresholding in the released
    models). ``safety_checker``, ``feature_extractor`` and ``watermarker`` are skipped (see the module).
    """

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, num_inference_steps: int = 100,
                 timesteps: Sequence[int] | None = None, guidance_scale: float = 7.0,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
                 height: int | None = None, width: int | None = None, eta: float = 0.0, generator: Generator = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, callback: Callback | None = None,
                 callback_steps: int = 1, clean_caption: bool = False,
                 callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)) -> IFPipelineOutput | tuple:
        """Generate ``num_images_per_prompt`` images per prompt.

        Args:
            prompt, negative_prompt: text(s) to follow and to steer away from (str or list of str);
                or pass ``prompt_embeds`` / ``negative_prompt_embeds`` (e.g. from :meth:`encode_prompt`).
            num_inference_steps, timesteps: the schedule (or custom timesteps, in descending order).
            guidance_scale: classifier-free guidance weight w (Imagen's eq. 2); guidance runs for w > 1.
            height, width: image size in pixels (default the UNet's sample size), multiples of the
                UNet's down-sampling factor.
            eta: DDIM's noise weight (ignored by DDPM); generator: one torch.Generator, or one per image.
            output_type: "pil", "np" (images in [0, 1]) or "pt" (the sample in [-1, 1]).
            callback, callback_steps: ``callback(i, t, x)`` every ``callback_steps`` steps (diffusers');
                or ``callback_on_step_end(pipe, i, t, {name: tensor})`` with
                ``callback_on_step_end_tensor_inputs``, whose returned tensors replace the loop's.
            clean_caption: must be False (caption cleaning is not supported).
        """
        self.check_common(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
                          output_type, clean_caption)
        height, width = tc.image_size(height, width, self.default_size(), self.size_multiple())
        on_step = step_callback(callback, callback_steps, callback_on_step_end)
        # 1. text embeddings ([c0; c] under guidance), 2. timesteps, 3. x_T ~ N(0, I), 4. denoise
        batch, state = self._conditioning(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                          num_images_per_prompt, guidance_scale)
        run = set_timesteps(self.scheduler, num_inference_steps, timesteps=timesteps)
        dtype = state["prompt_embeds"].dtype
        noise = initial_noise((batch, self.unet.config.in_channels, height, width), generator, self.device, dtype)
        image = self._denoise(noise, run, state, generator=generator, eta=eta, callback=on_step,
                              callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        return self._finish(image, output_type, return_dict)
