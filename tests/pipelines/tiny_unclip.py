"""Tiny random unCLIP pipelines (text-to-image and image variation) built with HF diffusers and transformers, offline.

The configs follow diffusers' own fast tests (tests/pipelines/unclip): a 32-wide CLIP text model with
projection, a one-layer prior, a 32x32 decoder with SimpleCrossAttn blocks, added-KV attention,
scale-shift resnets and an identity class embedding, and two 64x64 super-resolution UNet2DModels.
The tokenizer is tiny_sd's character-level CLIP BPE, written to disk. Weights are perturbed so no
zero-initialised layer makes an output constant.
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch
import transformers
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

from pipelines.tiny_sd import LETTERS, _perturb, clip_tokenizer

WIDTH = 32  # CLIP hidden size = projection size = the prior's embedding_dim
CLIP_TEXT = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=WIDTH, projection_dim=WIDTH,
                 intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                 vocab_size=len(LETTERS) * 2 + 2)
CLIP_VISION = dict(hidden_size=WIDTH, projection_dim=WIDTH, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, intermediate_size=37, patch_size=8)
PRIOR = dict(num_attention_heads=2, attention_head_dim=12, embedding_dim=WIDTH, num_layers=1)
TEXT_PROJ = dict(clip_embeddings_dim=WIDTH, time_embed_dim=128, cross_attention_dim=100)
DECODER = dict(sample_size=32, in_channels=3, out_channels=6,
               down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
               up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
               mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
               cross_attention_dim=100, attention_head_dim=4, resnet_time_scale_shift="scale_shift",
               class_embed_type="identity")
SUPER_RES = dict(sample_size=64, layers_per_block=1, down_block_types=("ResnetDownsampleBlock2D",) * 2,
                 up_block_types=("ResnetUpsampleBlock2D",) * 2, block_out_channels=(32, 64), in_channels=6,
                 out_channels=3)
PRIOR_SCHEDULER = dict(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0)
DECODER_SCHEDULER = dict(variance_type="learned_range", prediction_type="epsilon")
SUPER_RES_SCHEDULER = dict(variance_type="fixed_small_log", prediction_type="epsilon")


def _eval(*modules: torch.nn.Module) -> None:
    for m in modules:
        _perturb(m)
        m.eval()


def shared_components(work: Path, seed: int = 0) -> dict:
    """The decoder-side components both unCLIP pipelines hold."""
    torch.manual_seed(seed)
    text_encoder = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**CLIP_TEXT))
    text_proj = UnCLIPTextProjModel(**TEXT_PROJ)
    decoder = diffusers.UNet2DConditionModel(**DECODER)
    first, last = diffusers.UNet2DModel(**SUPER_RES), diffusers.UNet2DModel(**SUPER_RES)
    _eval(text_encoder, text_proj, decoder, first, last)
    return dict(decoder=decoder, text_encoder=text_encoder, tokenizer=clip_tokenizer(work / "tokenizer-files"),
                text_proj=text_proj, super_res_first=first, super_res_last=last,
                decoder_scheduler=diffusers.UnCLIPScheduler(**DECODER_SCHEDULER),
                super_res_scheduler=diffusers.UnCLIPScheduler(**SUPER_RES_SCHEDULER))


def build_unclip(directory: Path, seed: int = 0) -> diffusers.UnCLIPPipeline:
    """Save a tiny diffusers UnCLIPPipeline into ``directory``; returns it."""
    directory = Path(directory)
    components = shared_components(directory.parent / f".{directory.name}-work", seed)
    prior = diffusers.PriorTransformer(**PRIOR)
    _eval(prior)
    with torch.no_grad():  # a non-degenerate CLIP-embedding normalisation
        prior.clip_std.copy_(1 + 0.1 * torch.randn_like(prior.clip_std))
    pipe = diffusers.UnCLIPPipeline(prior=prior, prior_scheduler=diffusers.UnCLIPScheduler(**PRIOR_SCHEDULER),
                                    **components)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(directory)
    return pipe


def build_image_variation(directory: Path, seed: int = 0) -> diffusers.UnCLIPImageVariationPipeline:
    """Save a tiny diffusers UnCLIPImageVariationPipeline into ``directory``; returns it."""
    directory = Path(directory)
    components = shared_components(directory.parent / f".{directory.name}-work", seed)
    image_encoder = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**CLIP_VISION))
    _eval(image_encoder)
    processor = transformers.CLIPImageProcessor(crop_size=32, size=32)
    pipe = diffusers.UnCLIPImageVariationPipeline(image_encoder=image_encoder, feature_extractor=processor,
                                                  **components)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(directory)
    return pipe
