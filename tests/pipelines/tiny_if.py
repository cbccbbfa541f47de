"""Tiny random DeepFloyd IF pipelines (stage I, img2img, stage II) built with HF diffusers and transformers, offline.

The UNets and schedulers are those of diffusers' own IF tests (``_get_dummy_components`` and
``_get_superresolution_dummy_components`` in diffusers' tests/pipelines/deepfloyd_if/__init__.py;
the configs live in tests/models/test_unet_2d_condition_if.py). diffusers' tests take the text
encoder and tokenizer from the Hub (hf-internal-testing/tiny-random-t5); with no network here the
encoder is a ``T5EncoderModel`` built from a small ``T5Config`` with random weights, and the
tokenizer a ``T5Tokenizer`` built from a written vocabulary of unigram pieces (transformers 5's
T5Tokenizer needs no sentencepiece model): one piece per character, with and without the word
marker, so every lower-case prompt tokenises without unknown tokens. Weights are drawn from a
fixed seed and the UNet's perturbed, so no output is trivially zero. Stage I images are 32 x 32.
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch
import transformers

from models.test_unet_2d_condition_if import STAGE_1, STAGE_2, TEXT

SIZE = 32  # stage-I image side (the UNet's sample_size)
LOW = 16  # the low-resolution side given to the super-resolution tests
# Images are compared in float32 on the CPU; the brief's bound. Measured figures are printed by the tests.
ATOL = 1e-4
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(",.!?'-")
T5 = dict(d_model=TEXT, d_ff=37, d_kv=8, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
          dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
# diffusers' IF test scheduler (stage I and II) and the stage-II image-noising scheduler
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02,
                 thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.0, prediction_type="epsilon",
                 variance_type="learned_range")
NOISING_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
                         beta_end=0.02)


def _perturb(module: torch.nn.Module, scale: float = 0.05) -> None:
    """Add noise to every weight, so zero-initialised output layers do not make outputs constant."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def t5_tokenizer() -> transformers.T5Tokenizer:
    """A T5 tokenizer (<pad> 0, </s> 1, <unk> 2) whose pieces are single characters, built offline."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in LETTERS] + [("\u2581" + c, -2.5) for c in LETTERS]
    return transformers.T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=77)


def t5_encoder(tokenizer: transformers.T5Tokenizer) -> transformers.T5EncoderModel:
    return transformers.T5EncoderModel(transformers.T5Config(vocab_size=len(tokenizer), **T5)).eval()


def if_components(stage: int = 1, seed: int = 0, variance_type: str = "learned_range") -> dict:
    """The components of a diffusers IF pipeline of ``stage`` 1 (IFPipeline / IFImg2ImgPipeline) or 2
    (IFSuperResolutionPipeline), tiny and random; safety checker, feature extractor and watermarker None."""
    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    text_encoder = t5_encoder(tokenizer)
    unet = diffusers.UNet2DConditionModel(**(STAGE_1 if stage == 1 else STAGE_2))
    _perturb(unet)
    unet.eval()
    components = dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet,
                      scheduler=diffusers.DDPMScheduler(**dict(SCHEDULER, variance_type=variance_type)),
                      safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    if stage == 2:
        components["image_noising_scheduler"] = diffusers.DDPMScheduler(**NOISING_SCHEDULER)
    return components


def build_if(directory: Path, pipeline: str = "IFPipeline", seed: int = 0, variance_type: str = "learned_range"):
    """Save a tiny diffusers IF pipeline of class ``pipeline`` into ``directory``; returns the diffusers pipeline."""
    stage = 2 if pipeline == "IFSuperResolutionPipeline" else 1
    pipe = getattr(diffusers, pipeline)(**if_components(stage, seed, variance_type))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(Path(directory))
    return pipe
