"""The pieces every text-conditioned pipeline (Stable Diffusion, LDM, DeepFloyd IF) shares, one implementation each.

- prompt encoding: tokenise to a fixed length, run the text encoder, repeat per image; a prompt and
  its negative under guidance (:func:`encode_prompts`);
- the guidance-scale embedding of guidance-distilled UNets (the guidance itself is
  :mod:`fusediff.sampling.guidance`, timesteps and start noise the rest of :mod:`fusediff.sampling`);
- batches: images spread over prompts, image sizes;
- the VAE: encode with a sampled posterior (one generator per image if a list is given), decode;
- images: PIL / numpy / torch inputs to a (B, C, H, W) tensor in [-1, 1], masks to {0, 1}; outputs to
  PIL, numpy, torch or latents.

Every function draws its random numbers, and orders its arithmetic, as diffusers' Stable Diffusion
pipelines and ``VaeImageProcessor`` do, so a seeded CPU run reproduces diffusers' images (DESIGN.md,
decision 5). Components are used through their diffusers API only (``unet(x, t,
encoder_hidden_states=...).sample``, ``vae.encode(x).latent_dist``, ``scheduler.step(...).prev_sample``),
so fusediff's models and diffusers' own both work. Limits: no LoRA scale, textual inversion or
IP-Adapter embeddings; PIL inputs that are not RGB are converted to RGB (diffusers would fail later).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..utils.torch_utils import Generator
from . import pipeline_utils
from .pipeline_utils import postprocess_images

logger = logging.getLogger(__name__)

OUTPUT_TYPES = (*pipeline_utils.OUTPUT_TYPES, "latent")


# -- prompts -----------------------------------------------------------------------------------
def batch_size_of(prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None) -> int:
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        return len(prompt)
    return prompt_embeds.shape[0]


def check_prompts(prompt: Any, negative_prompt: Any, prompt_embeds: torch.Tensor | None,
                  negative_prompt_embeds: torch.Tensor | None) -> None:
    """A prompt or its embeddings (not both), of the right types; embeddings of equal shapes."""
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("pass prompt or prompt_embeds, not both")
    if prompt is None and prompt_embeds is None:
        raise ValueError("pass a prompt (str or list of str) or prompt_embeds")
    if prompt is not None and not (isinstance(prompt, str) or
                                   (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))):
        raise ValueError(f"prompt must be a str or a list of str; got {type(prompt).__name__}")
    if isinstance(prompt, list) and not prompt:
        raise ValueError("prompt is an empty list")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
    if prompt_embeds is not None and negative_prompt_embeds is not None \
            and prompt_embeds.shape != negative_prompt_embeds.shape:
        raise ValueError(f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                         f"{tuple(negative_prompt_embeds.shape)} must have the same shape")


def negative_texts(prompt: str | list[str] | None, negative_prompt: str | list[str] | None,
                   batch_size: int) -> list[str]:
    """The unconditional texts of a guided batch: "" per prompt, or the negative prompt(s)."""
    if negative_prompt is None:
        return [""] * batch_size
    if prompt is not None and type(prompt) is not type(negative_prompt):
        raise TypeError(f"negative_prompt must have prompt's type ({type(prompt).__name__}); "
                        f"got {type(negative_prompt).__name__}")
    if isinstance(negative_prompt, str):
        return [negative_prompt]
    if len(negative_prompt) != batch_size:
        raise ValueError(f"got {len(negative_prompt)} negative prompts for {batch_size} prompts")
    return list(negative_prompt)


def tokenize(tokenizer: Any, texts: str | list[str], max_length: int, *, warn_truncation: bool = True) -> Any:
    """The tokenizer's output (``input_ids``, ``attention_mask``) of ``texts`` padded and truncated to
    ``max_length``; a warning names what truncation dropped."""
    inputs = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    if warn_truncation:
        ids = inputs.input_ids
        full = tokenizer(texts, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] >= ids.shape[-1] and not torch.equal(ids, full):
            lost = tokenizer.batch_decode(full[:, max_length - 1:-1])
            logger.warning("the prompt was truncated to %d tokens; dropped: %s", max_length, lost)
    return inputs


def encode_text(tokenizer: Any, text_encoder: Any, texts: str | list[str], max_length: int,
                device: torch.device, *, use_attention_mask: bool = False, clip_skip: int | None = None,
                warn_truncation: bool = True) -> torch.Tensor:
    """(B, max_length, D) hidden states of ``texts``, padded and truncated to ``max_length`` tokens.

    ``clip_skip`` = k takes the hidden state k layers before the last, through the final layer norm.
    """
    inputs = tokenize(tokenizer, texts, max_length, warn_truncation=warn_truncation)
    ids = inputs.input_ids
    mask = inputs.attention_mask.to(device) if use_attention_mask else None
    if clip_skip is None:
        return text_encoder(ids.to(device), attention_mask=mask)[0]
    hidden = text_encoder(ids.to(device), attention_mask=mask, output_hidden_states=True)[-1]
    final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm  # transformers 5 has no text_model
    return final_norm(hidden[-(clip_skip + 1)])


def repeat_per_prompt(embeds: torch.Tensor, num_images_per_prompt: int) -> torch.Tensor:
    """(B, S, D) -> (B * n, S, D), each prompt's rows kept together."""
    batch, seq, _ = embeds.shape
    return embeds.repeat(1, num_images_per_prompt, 1).view(batch * num_images_per_prompt, seq, -1)


def encode_prompts(tokenizer: Any, text_encoder: Any, prompt: str | list[str] | None, device: torch.device,
                   num_images_per_prompt: int, do_classifier_free_guidance: bool,
                   negative_prompt: str | list[str] | None = None, prompt_embeds: torch.Tensor | None = None,
                   negative_prompt_embeds: torch.Tensor | None = None, *, max_length: int | None,
                   dtype: torch.dtype, use_attention_mask: bool = False, clip_skip: int | None = None,
                   preprocess: Callable[[list[str]], list[str]] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt embeddings, negative ones), each (B * num_images_per_prompt, S, D), as diffusers' text
    pipelines encode them: the prompt (unless its embeddings are given), then, under guidance, the
    negative prompt or "" padded to the prompt's length. ``preprocess`` maps the texts first (DeepFloyd
    IF lower-cases and strips them). Without guidance the negative embeddings are returned as given."""
    batch_size = batch_size_of(prompt, prompt_embeds)
    texts_of = preprocess or (lambda texts: texts)
    if prompt_embeds is None:
        if tokenizer is None or text_encoder is None:
            raise ValueError("this pipeline has no tokenizer or text encoder: pass prompt_embeds")
        texts = texts_of([prompt] if isinstance(prompt, str) else list(prompt))
        prompt_embeds = encode_text(tokenizer, text_encoder, texts, max_length, device,
                                    use_attention_mask=use_attention_mask, clip_skip=clip_skip)
    prompt_embeds = repeat_per_prompt(prompt_embeds.to(dtype=dtype, device=device), num_images_per_prompt)
    if do_classifier_free_guidance and negative_prompt_embeds is None:
        if tokenizer is None or text_encoder is None:
            raise ValueError("this pipeline has no tokenizer or text encoder: pass negative_prompt_embeds")
        texts = texts_of(negative_texts(prompt, negative_prompt, batch_size))
        negative_prompt_embeds = encode_text(tokenizer, text_encoder, texts, prompt_embeds.shape[1], device,
                                             use_attention_mask=use_attention_mask, warn_truncation=False)
    if do_classifier_free_guidance:
        negative_prompt_embeds = repeat_per_prompt(negative_prompt_embeds.to(dtype=dtype, device=device),
                                                   num_images_per_prompt)
    return prompt_embeds, negative_prompt_embeds


# -- guidance-distilled UNets -----------------------------------------------------------------
def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of 1000 w, the timestep condition of guidance-distilled UNets (VDM, LCM)."""
    w = w * 1000.0
    half = embedding_dim // 2
    freq = torch.exp(torch.arange(half, dtype=dtype) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w.to(dtype)[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if embedding_dim % 2 == 1 else emb


# -- batches -------------------------------------------------------------------------------
def spread_batch(x: torch.Tensor, batch: int, what: str = "images", *, contiguous: bool = False) -> torch.Tensor:
    """``x`` tiled to ``batch`` rows (all of x, then all again), as diffusers spreads images over prompts.

    The memory layout is diffusers' too (it picks the conv kernels, so it shows in the last bits):
    img2img concatenates, which keeps a channels-last input channels-last; inpainting repeats,
    which returns a contiguous tensor (``contiguous=True``).
    """
    if x.shape[0] > batch or batch % x.shape[0]:
        raise ValueError(f"cannot spread {x.shape[0]} {what} over {batch} outputs; pass 1 or {batch}")
    tiled = torch.cat([x] * (batch // x.shape[0]))
    return tiled.contiguous() if contiguous else tiled


def image_size(height: int | None, width: int | None, default: tuple[int, int], multiple: int) -> tuple[int, int]:
    """(height, width), each the given value or the default, checked to be a positive multiple of ``multiple``."""
    height = default[0] if height is None else height
    width = default[1] if width is None else width
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple}; got {value!r}")
    return height, width


def check_output_type(output_type: str) -> None:
    pipeline_utils.check_output_type(output_type, OUTPUT_TYPES)


# -- the VAE -----------------------------------------------------------------------------------
def _latents_of(encoded: Any, generator: torch.Generator | None) -> torch.Tensor:
    if hasattr(encoded, "latent_dist"):
        return encoded.latent_dist.sample(generator)  # z = mean + std * N(0, I)
    if hasattr(encoded, "latents"):  # VQ models encode deterministically
        return encoded.latents
    raise AttributeError(f"cannot read latents from {type(encoded).__name__}")


def encode_image(vae: Any, image: torch.Tensor, generator: Generator) -> torch.Tensor:
    """scaling_factor * z of a (B, C, H, W) image; with a list of generators image i uses generator i."""
    if isinstance(generator, (list, tuple)):
        if len(generator) < image.shape[0]:
            raise ValueError(f"got {len(generator)} generators for {image.shape[0]} images; pass one per image")
        latents = torch.cat([_latents_of(vae.encode(image[i:i + 1]), generator[i]) for i in range(image.shape[0])])
    else:
        latents = _latents_of(vae.encode(image), generator)
    return vae.config.scaling_factor * latents


def decode_latents(vae: Any, latents: torch.Tensor, scaling_factor: float | None = None) -> torch.Tensor:
    """The (B, C, H, W) image in [-1, 1] (unclamped) of latents z: vae.decode(z / scaling_factor)."""
    scale = vae.config.scaling_factor if scaling_factor is None else scaling_factor
    return vae.decode(latents / scale).sample


# -- images ------------------------------------------------------------------------------------
def _is_image(x: Any) -> bool:
    return isinstance(x, PIL.Image.Image) or (isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim in (2, 3))


def _numpy_to_pt(images: np.ndarray) -> torch.Tensor:
    if images.ndim == 3:  # (B, H, W) -> (B, H, W, 1)
        images = images[..., None]
    return torch.from_numpy(images.transpose(0, 3, 1, 2))


def _floor_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    return height - height % multiple, width - width % multiple


def preprocess_image(image: Any, height: int | None = None, width: int | None = None, *, multiple: int = 8,
                     mask: bool = False, latent_channels: int = 4) -> torch.Tensor:
    """A (B, C, H, W) tensor from PIL images, (H, W[, C]) / (B, H, W, C) arrays in [0, 1], or (C, H, W) /
    (B, C, H, W) tensors in [0, 1], or a list of them.

    Resized to ``height`` x ``width`` (default: the input's size floored to ``multiple``), with
    Lanczos for PIL images and nearest neighbour for arrays and tensors. Images are mapped to
    [-1, 1] (tensors already below 0 are taken as [-1, 1]); a tensor with ``latent_channels``
    channels is returned as is (already latents). With ``mask``, the result has one channel,
    0 where x < 0.5 and 1 elsewhere.
    """
    if mask and isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 3:  # a batch of (H, W) masks
        if isinstance(image, torch.Tensor):
            image = image.unsqueeze(1)
        else:
            image = np.expand_dims(image, axis=0 if image.shape[-1] == 1 else -1)
    if isinstance(image, list) and image and isinstance(image[0], np.ndarray) and image[0].ndim == 4:
        image = np.concatenate(image, axis=0)
    if isinstance(image, list) and image and isinstance(image[0], torch.Tensor) and image[0].ndim == 4:
        image = torch.cat(image, dim=0)
    valid = (isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4) or _is_image(image) \
        or (isinstance(image, list) and image and all(_is_image(i) for i in image))
    if not valid:
        raise ValueError(f"image must be a PIL image, a numpy array or torch tensor of 2 to 4 dims, or a list "
                         f"of them; got {type(image).__name__}")
    images = image if isinstance(image, list) else [image]

    if isinstance(images[0], PIL.Image.Image):
        h, w = _floor_size(images[0].height, images[0].width, multiple)
        height, width = height or h, width or w
        images = [i.resize((width, height), resample=PIL.Image.Resampling.LANCZOS) for i in images]
        mode = "L" if mask else "RGB"
        images = [i if i.mode == mode else i.convert(mode) for i in images]
        batch = np.stack([np.array(i).astype(np.float32) / 255.0 for i in images], axis=0)
        tensor = _numpy_to_pt(batch)
    else:
        if isinstance(images[0], np.ndarray):
            stacked = np.concatenate(images, axis=0) if images[0].ndim == 4 else np.stack(images, axis=0)
            tensor = _numpy_to_pt(stacked)
        else:
            tensor = torch.cat(images, dim=0) if images[0].ndim == 4 else torch.stack(images, dim=0)
            if mask and tensor.ndim == 3:
                tensor = tensor.unsqueeze(1)
            if tensor.shape[1] == latent_channels:
                return tensor
        h, w = _floor_size(tensor.shape[2], tensor.shape[3], multiple)
        tensor = torch.nn.functional.interpolate(tensor, size=(height or h, width or w))

    if mask:
        tensor = tensor.clone()
        tensor[tensor < 0.5] = 0
        tensor[tensor >= 0.5] = 1
        return tensor
    if tensor.min() < 0:
        logger.warning("image values reach %.3g < 0: taken as already in [-1, 1]; pass images in [0, 1]",
                       float(tensor.min()))
        return tensor
    return 2.0 * tensor - 1.0


def postprocess(image: torch.Tensor, output_type: str, do_denormalize: Sequence[bool] | None = None) -> Any:
    """:func:`~fusediff.pipelines.pipeline_utils.postprocess_images` after checking ``output_type``."""
    check_output_type(output_type)
    return postprocess_images(image, output_type, do_denormalize)
