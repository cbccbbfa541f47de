"""Tiny random Stable Diffusion and LDM pipelines built with HF diffusers and transformers, offline.

``build_sd(directory, ...)`` writes a diffusers pipeline directory (UNet2DConditionModel,
AutoencoderKL with a 4x down-sampling, a 2-layer CLIPTextModel and a CLIPTokenizer whose
vocab.json / merges.txt are written here: one token per character, no merges) and returns the
diffusers pipeline object. ``build_ldm`` does the same for LDMTextToImagePipeline (VQModel, a
tiny LDMBert and a BertTokenizer with a written vocab.txt). Weights are drawn from a fixed
seed and perturbed, so no output is trivially zero. Images are 32 x 32 (latents 8 x 8).
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers

SIZE = 32  # image side in pixels
# Images are in [0, 1], compared in float32 on the CPU. fusediff's UNet, VAE and schedulers (the
# reference kernels, fp64 scheduler coefficients) round differently from diffusers' eager ops: the
# measured max |diff| over these tests is 4.1e-6 (2-5 steps). 2e-5 leaves a 5x margin and still
# catches a wrong random draw, order or coefficient (those differ by more than 1e-2). With diffusers'
# own models and schedulers inside fusediff's pipelines the images are bit-identical.
ATOL = 2e-5
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(",.!?'-")

UNET = dict(sample_size=SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16, norm_num_groups=4,
            attention_head_dim=4)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16), layers_per_block=1,
           down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
           norm_num_groups=4, sample_size=SIZE)
CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
# LDM: diffusers' LDM pipeline samples latents of height // 8, so its VQ model down-samples 8x
VQ = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 16), layers_per_block=1,
          down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
          norm_num_groups=4, num_vq_embeddings=32, vq_embed_dim=4, sample_size=SIZE)
LDM_UNET = dict(UNET, sample_size=SIZE // 8, block_out_channels=(8, 16), cross_attention_dim=16)
LDM_BERT = dict(max_position_embeddings=77, encoder_layers=2, encoder_ffn_dim=32, encoder_attention_heads=2,
                head_dim=8, d_model=16)

SCHEDULERS = {  # test name: (diffusers class name, config overrides from the SD defaults)
    "ddim": ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False)),
    "pndm": ("PNDMScheduler", dict(skip_prk_steps=True, set_alpha_to_one=False)),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
# Stable Diffusion's scheduler config (v1 checkpoints)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    steps_offset=1)


def _perturb(module: torch.nn.Module, scale: float = 0.05) -> None:
    """Add noise to every weight, so zero-initialised output layers do not make outputs constant."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def write_clip_tokenizer_files(directory: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt of a character-level CLIP BPE: no merges, so every character is a token."""
    directory.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + LETTERS + [c + "</w>" for c in LETTERS]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return directory / "vocab.json", directory / "merges.txt"


def clip_tokenizer(directory: Path) -> transformers.CLIPTokenizer:
    vocab, merges = write_clip_tokenizer_files(directory)
    return transformers.CLIPTokenizer(str(vocab), str(merges), model_max_length=77)


def scheduler(name: str):
    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name)(**SD_SCHEDULER, **overrides)


def sd_components(work: Path, scheduler_name: str = "ddim", unet_in_channels: int = 4, seed: int = 0) -> dict:
    """The components of a diffusers StableDiffusionPipeline, tiny and random."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**dict(UNET, in_channels=unet_in_channels))
    vae = diffusers.AutoencoderKL(**VAE)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(vocab_size=len(LETTERS) * 2 + 2, **CLIP))
    for module in (unet, vae, text_encoder):
        _perturb(module)
        module.eval()
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(work / "tokenizer-files"),
                scheduler=scheduler(scheduler_name), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)


def build_sd(directory: Path, scheduler_name: str = "ddim", pipeline: str = "StableDiffusionPipeline",
             unet_in_channels: int = 4, seed: int = 0):
    """Save a tiny diffusers pipeline of class ``pipeline`` into ``directory``; returns the diffusers pipeline."""
    directory = Path(directory)
    components = sd_components(directory.parent / f".{directory.name}-work", scheduler_name, unet_in_channels, seed)
    pipe = getattr(diffusers, pipeline)(**components)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(directory)
    return pipe


def bert_tokenizer(directory: Path) -> transformers.BertTokenizer:
    directory.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + LETTERS + ["##" + c for c in LETTERS]
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return transformers.BertTokenizer(str(directory / "vocab.txt"))


def build_ldm(directory: Path, scheduler_name: str = "ddim", seed: int = 0):
    """Save a tiny diffusers LDMTextToImagePipeline into ``directory``; returns the diffusers pipeline."""
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    directory = Path(directory)
    tokenizer = bert_tokenizer(directory.parent / f".{directory.name}-work")
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**LDM_UNET)
    vqvae = diffusers.VQModel(**VQ)
    bert = LDMBertModel(LDMBertConfig(vocab_size=len(tokenizer.vocab), **LDM_BERT))
    for module in (unet, vqvae, bert):
        _perturb(module)
        module.eval()
    pipe = diffusers.LDMTextToImagePipeline(vqvae=vqvae, bert=bert, tokenizer=tokenizer, unet=unet,
                                            scheduler=scheduler(scheduler_name))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(directory)
    return pipe


def assert_same_images(ours: np.ndarray, theirs: np.ndarray, atol: float = ATOL) -> float:
    """Compare two (B, H, W, C) image arrays in [0, 1]; print and return the max |difference|."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    diff = np.abs(ours - theirs)
    where = np.unravel_index(diff.argmax(), diff.shape)
    print(f"max |fusediff - diffusers| = {diff.max():.3g} at {where}")
    assert diff.max() <= atol, f"max |diff| {diff.max():.3g} at {where}: ours {ours[where]}, diffusers {theirs[where]}"
    assert theirs.std() > 0.01  # not two constant images
    return float(diff.max())


def edit_index(directory: Path, **changes) -> None:
    """Change entries of a pipeline directory's model_index.json."""
    path = Path(directory) / "model_index.json"
    index = json.loads(path.read_text())
    index.update(changes)
    path.write_text(json.dumps(index))
