"""The stages unCLIP's text-to-image and image-variation pipelines share: text encoding, decoder, super-resolution.

    y, c, m     = CLIP text embedding, token states and mask of the prompts ("" for variations)   [""; prompt]
    ctx, temb   = text_proj(image embedding, y, c)                    4 image tokens + text tokens; time addition
    x_64        = denoise(decoder(x, t, ctx, class_labels=temb, mask=[1]*4 + m))    guided, learned variance
    x_64        = clamp(x_64, -1, 1)
    up          = bicubic(x_64 -> 256), antialiased
    x_256       = denoise(super_res([x, up], t)), super_res_last at the final step     no guidance

Every stage runs :func:`fusediff.sampling.denoise`, whose steps pass the run's next timestep to the
scheduler's ``prev_timestep`` (unCLIP's schedulers re-derive beta over a strided step). Decoder
guidance combines the first ``C`` output channels (the noise) and keeps the conditional half's
variance channels, as diffusers does: the unconditional half's variance is replaced by the
conditional one's before the loop's guidance, so eps_u + w (eps_c - eps_u) leaves it exactly as it is.
Random numbers are drawn as diffusers' unCLIP pipelines draw them (latents of each stage from
``generator`` just before the stage, the schedulers' noise from the same generator), so a seeded CPU
run gives diffusers' images (DESIGN.md, decision 5).

Limits: the super-resolution stage switches UNets at its last step, so its model call is not
replayed from CUDA graphs (the prior and the decoder are, under ``enable_cuda_graph``); no CPU
offloading, no XLA.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from ..sampling import Guidance, denoise, initial_noise, module_memory_format
from ..utils.torch_utils import Generator
from . import text_conditioning as tc
from .pipeline_utils import DiffusionPipeline, ImagePipelineOutput, check_output_type, postprocess_images


def check_steps(**steps: Any) -> None:
    """ValueError unless each named step count is an int of at least 2 (unCLIP's schedules need two)."""
    for name, value in steps.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"{name} must be an int >= 2 (unCLIP's step ratio is (T - 1) / (n - 1)); got {value!r}")


def check_scale(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number; got {value!r}")
    return float(value)


def decoder_prediction(decoder: Any, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                       class_labels: torch.Tensor, attention_mask: torch.Tensor, guided: bool) -> torch.Tensor:
    """The decoder's output on x ([x; x] when ``guided``); guided, the unconditional half's variance channels
    are the conditional half's, so that guidance leaves them as the conditional prediction."""
    out = decoder(x, t, encoder_hidden_states=encoder_hidden_states, class_labels=class_labels,
                  attention_mask=attention_mask).sample
    channels = x.shape[1]
    if not guided or out.shape[1] == channels:
        return out
    uncond, cond = out.chunk(2)
    return torch.cat([torch.cat([uncond[:, :channels], cond[:, channels:]], dim=1), cond])


class SuperResPrediction:
    """The super-resolution model call: [x, upscaled image] through ``first``, and ``last`` at the final step.

    Counts its calls (one per step, no guidance) rather than reading t back from the device.
    """

    def __init__(self, first: Any, last: Any, image_upscaled: torch.Tensor, num_steps: int) -> None:
        self.first, self.last, self.image_upscaled, self.num_steps = first, last, image_upscaled, num_steps
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        unet = self.last if self.calls == self.num_steps - 1 else self.first
        self.calls += 1
        return unet(torch.cat([x, self.image_upscaled], dim=1), t).sample


class UnCLIPStages(DiffusionPipeline):
    """Text encoding, decoder and super-resolution of the unCLIP pipelines (not used directly)."""

    # -- text ------------------------------------------------------------------------------
    def _text_outputs(self, texts: list[str], device: torch.device, *, truncate: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text_embeds (B, D), last_hidden_state (B, L, D), mask (B, L) bool) of ``texts``."""
        inputs = tc.tokenize(self.tokenizer, texts, self.tokenizer.model_max_length, warn_truncation=truncate)
        out = self.text_encoder(inputs.input_ids.to(device))
        return out.text_embeds, out.last_hidden_state, inputs.attention_mask.bool().to(device)

    def _text_conditions(self, texts: list[str] | None, device: torch.device, num_images_per_prompt: int,
                         guided: bool, given: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt embeds, token states, mask), each repeated per image and, guided, [""; prompt] stacked."""
        embeds, states, mask = self._text_outputs(texts, device) if given is None else given
        batch = embeds.shape[0]
        embeds, states, mask = (v.repeat_interleave(num_images_per_prompt, dim=0) for v in (embeds, states, mask))
        if guided:
            u_embeds, u_states, u_mask = self._text_outputs([""] * batch, device, truncate=False)
            u_embeds, u_states, u_mask = (v.repeat_interleave(num_images_per_prompt, dim=0)
                                          for v in (u_embeds, u_states, u_mask))
            embeds, states, mask = (torch.cat([u, c]) for u, c in ((u_embeds, embeds), (u_states, states),
                                                                    (u_mask, mask)))
        return embeds, states, mask

    # -- decoder ---------------------------------------------------------------------------
    def _decode(self, image_embeddings: torch.Tensor, prompt_embeds: torch.Tensor, text_states: torch.Tensor,
                text_mask: torch.Tensor, *, guided: bool, guidance_scale: float, num_inference_steps: int,
                generator: Generator, latents: torch.Tensor | None) -> torch.Tensor:
        """The decoder's 64x64 images in [-1, 1] (clamped) of (B, D) image embeddings."""
        context, time_embeddings = self.text_proj(image_embeddings=image_embeddings, prompt_embeds=prompt_embeds,
                                                  text_encoder_hidden_states=text_states,
                                                  do_classifier_free_guidance=guided)
        mask = F.pad(text_mask, (self.text_proj.clip_extra_context_tokens, 0), value=True)
        size = self.decoder.config.sample_size
        shape = (image_embeddings.shape[0], self.decoder.config.in_channels, size, size)
        noise = initial_noise(shape, generator, self.device, context.dtype, latents)
        predict = functools.partial(decoder_prediction, self.decoder, guided=guided)
        x = denoise(self.decoder_scheduler, predict, noise, num_inference_steps=num_inference_steps,
                    model_kwargs={"encoder_hidden_states": context, "class_labels": time_embeddings,
                                  "attention_mask": mask},
                    guidance=Guidance(guidance_scale) if guided else None, generator=generator,
                    progress=self.progress_bar, cuda_graph=self.model_call_graphs("decoder step", self.decoder),
                    memory_format=module_memory_format(self.decoder))
        return x.clamp(-1, 1)

    # -- super-resolution ------------------------------------------------------------------
    def _super_resolve(self, image_small: torch.Tensor, *, num_inference_steps: int, generator: Generator,
                       latents: torch.Tensor | None) -> torch.Tensor:
        """The super-resolution stage's images in [-1, 1] (unclamped) of the decoder's images."""
        size = self.super_res_first.config.sample_size
        shape = (image_small.shape[0], self.super_res_first.config.in_channels // 2, size, size)
        noise = initial_noise(shape, generator, self.device, image_small.dtype, latents)
        upscaled = F.interpolate(image_small, size=[size, size], mode="bicubic", align_corners=False, antialias=True)
        predict = SuperResPrediction(self.super_res_first, self.super_res_last, upscaled, num_inference_steps)
        return denoise(self.super_res_scheduler, predict, noise, num_inference_steps=num_inference_steps,
                       generator=generator, progress=self.progress_bar,
                       memory_format=module_memory_format(self.super_res_first))

    @staticmethod
    def _output(image: torch.Tensor, output_type: str, return_dict: bool) -> ImagePipelineOutput | tuple:
        images = postprocess_images(image, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    @staticmethod
    def _check_output_type(output_type: str) -> str:
        output_type = "np" if output_type == "numpy" else output_type  # diffusers' tests pass "numpy"
        check_output_type(output_type)
        return output_type
