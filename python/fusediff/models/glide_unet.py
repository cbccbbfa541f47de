"""GLIDE's UNets (Nichol et al. 2021, arXiv:2112.10741) as :class:`~fusediff.UNet2DConditionModel` configs.

glide-text2im's ``Text2ImUNet`` is the ADM UNet of improved diffusion (Nichol & Dhariwal 2021;
Dhariwal & Nichol 2021, Sec. 3) conditioned on text, which is what DeepFloyd IF's UNets inherit, so
the same blocks hold it (``ResnetDownsampleBlock2D`` / ``SimpleCrossAttnDownBlock2D`` and their up
and mid forms, :mod:`fusediff.models.unet_2d_simple_blocks`):

    glide-text2im                                fusediff / diffusers
    ResBlock (use_scale_shift_norm,              ResnetBlock2D, resnet_time_scale_shift="scale_shift";
      resblock_updown)                             the resampling ResBlocks as down/upsamplers
    GroupNorm32 (32 groups, eps 1e-5)            norm_num_groups=32, norm_eps=1e-5 (fused GroupNorm+SiLU)
    AttentionBlock(encoder_channels=xf_width)    AddedKVAttention: the text tokens' k, v first, then the map's
    num_head_channels (64)                       attention_head_dim (the head width in these blocks)
    emb = time_embed(t) + xf_proj                class_embed_type="identity", class_labels = xf_proj
    xf_out (B, W, L)                             encoder_hidden_states (B, L, W), cross_attention_dim = W
    out: 6 channels (eps, then the variance      out_channels=6; the scheduler's variance_type="learned_range"
      interpolation v of learned_range)

The text transformer is :class:`~fusediff.models.glide_text_encoder.GlideTextEncoder`. The four model
classes differ only in the input channels, which :func:`glide_model_input` assembles as glide-text2im
does: ``Text2ImUNet`` x (3); ``SuperResText2ImUNet`` [x, up(low_res)] (6);
``InpaintText2ImUNet`` [x, image * mask, mask] (7); ``SuperResInpaintText2ImUnet``
[x, image * mask, mask, up(low_res)] (10); up() is bilinear, ``align_corners=False``; mask 1 = known.

:data:`GLIDE_OPTIONS` are glide-text2im's published hyperparameters (``model_creation.py``:
``model_and_diffusion_defaults`` and ``_upsampler``) per checkpoint kind. Limits: GLIDE options other
than those of the released models' architecture (``use_scale_shift_norm`` and ``resblock_updown``
False, ``num_head_channels=-1``, ``channel_mult[0] != 1``, no text) raise NotImplementedError.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

_BASE = dict(image_size=64, num_channels=192, num_res_blocks=3, channel_mult="", num_heads=1, num_head_channels=64,
             num_heads_upsample=-1, attention_resolutions="32,16,8", dropout=0.1, text_ctx=128, xf_width=512,
             xf_layers=16, xf_heads=8, xf_final_ln=True, xf_padding=True, diffusion_steps=1000,
             noise_schedule="squaredcos_cap_v2", use_scale_shift_norm=True, resblock_updown=True, inpaint=False,
             super_res=False, n_vocab=50257)
_UPSAMPLE = dict(_BASE, image_size=256, num_res_blocks=2, noise_schedule="linear", super_res=True)
# the checkpoint kinds of glide-text2im's download.py that this converter reads: kind -> options
GLIDE_OPTIONS: dict[str, dict[str, Any]] = {
    "base": _BASE,
    "upsample": _UPSAMPLE,
    "base-inpaint": dict(_BASE, inpaint=True),
    "upsample-inpaint": dict(_UPSAMPLE, inpaint=True),
}
DEFAULT_CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}


def glide_options(kind: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The published options of checkpoint ``kind`` with ``overrides`` (glide-text2im's option names)."""
    if kind not in GLIDE_OPTIONS:
        raise ValueError(f"unknown GLIDE kind {kind!r}; one of {', '.join(GLIDE_OPTIONS)}")
    options = dict(GLIDE_OPTIONS[kind])
    unknown = sorted(set(overrides or {}) - set(options))
    if unknown:
        raise ValueError(f"unknown GLIDE options {unknown}; known: {sorted(options)}")
    options.update(overrides or {})
    return options


def channel_mult(options: Mapping[str, Any]) -> tuple[int, ...]:
    """glide-text2im's ``create_model`` channel multipliers: by image size, or the comma-separated option."""
    size, text = options["image_size"], options["channel_mult"]
    if text == "":
        if size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(f"unsupported GLIDE image_size {size} without channel_mult")
        return DEFAULT_CHANNEL_MULT[size]
    return tuple(int(m) for m in str(text).split(","))


def input_channels(options: Mapping[str, Any]) -> int:
    """3, 6, 7 or 10: the sample, [the masked image and the mask], [the upsampled low-res image]."""
    return 3 * (1 + bool(options["super_res"]) + bool(options["inpaint"])) + bool(options["inpaint"])


def _check_supported(options: Mapping[str, Any]) -> None:
    fixed = dict(use_scale_shift_norm=True, resblock_updown=True)
    for key, value in fixed.items():
        if bool(options[key]) != value:
            raise NotImplementedError(f"GLIDE option {key}={options[key]!r}: only the released models' {value} is "
                                      "supported")
    if options["num_head_channels"] == -1:
        raise NotImplementedError("GLIDE num_head_channels=-1 (a head count per block) is not supported")
    if not options["xf_width"]:
        raise NotImplementedError("GLIDE models without text (xf_width=0) are not supported")
    if channel_mult(options)[0] != 1:
        raise NotImplementedError("GLIDE channel_mult must start with 1 (the time embedding is 4 num_channels)")


def unet_config(options: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`~fusediff.UNet2DConditionModel` keyword arguments of the GLIDE model with ``options``."""
    _check_supported(options)
    mult, size = channel_mult(options), options["image_size"]
    attention_ds = {size // int(r) for r in str(options["attention_resolutions"]).split(",")}
    attends = [2**level in attention_ds for level in range(len(mult))]  # downsampling rate of each level
    down = ["SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attends]
    up = ["SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attends)]
    return dict(sample_size=size, in_channels=input_channels(options), out_channels=6, down_block_types=down,
                up_block_types=up, mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                block_out_channels=[options["num_channels"] * m for m in mult],
                layers_per_block=options["num_res_blocks"], norm_num_groups=32, norm_eps=1e-5,
                cross_attention_dim=options["xf_width"], attention_head_dim=options["num_head_channels"],
                resnet_time_scale_shift="scale_shift", class_embed_type="identity", flip_sin_to_cos=True,
                freq_shift=0, act_fn="silu", dropout=float(options["dropout"]))


def text_encoder_config(options: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`~fusediff.GlideTextEncoder` keyword arguments of the GLIDE model with ``options``."""
    return dict(vocab_size=options["n_vocab"], text_ctx=options["text_ctx"], width=options["xf_width"],
                layers=options["xf_layers"], heads=options["xf_heads"], final_ln=bool(options["xf_final_ln"]),
                padding=bool(options["xf_padding"]), time_embed_dim=4 * options["num_channels"])


def glide_conditioning(size: tuple[int, int], low_res: torch.Tensor | None = None,
                       inpaint_image: torch.Tensor | None = None,
                       inpaint_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """The channels glide-text2im concatenates after x: [image * mask, mask] (inpainting; mask 1 = known),
    then the low-res image upsampled to ``size`` (bilinear, align_corners=False); None for neither."""
    parts = []
    if inpaint_image is not None or inpaint_mask is not None:
        if inpaint_image is None or inpaint_mask is None:
            raise ValueError("inpainting needs both inpaint_image and inpaint_mask")
        parts += [inpaint_image * inpaint_mask, inpaint_mask]
    if low_res is not None:
        parts.append(F.interpolate(low_res, size, mode="bilinear", align_corners=False))
    return torch.cat(parts, dim=1) if parts else None


def glide_model_input(x: torch.Tensor, low_res: torch.Tensor | None = None, inpaint_image: torch.Tensor | None = None,
                      inpaint_mask: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, 3, H, W) with GLIDE's conditioning channels appended (:func:`glide_conditioning`)."""
    extra = glide_conditioning(tuple(x.shape[-2:]), low_res, inpaint_image, inpaint_mask)
    return x if extra is None else torch.cat([x, extra.to(x.dtype)], dim=1)
