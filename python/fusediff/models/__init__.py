"""fusediff.models: diffusion networks whose hot paths call :mod:`fusediff.kernels`.

Configs and parameter names follow diffusers', so ``save_pretrained`` directories load in
either library. :class:`UNet2DModel` is the image UNet of DDPM/DDIM/ADM; its building blocks
(residual, attention and embedding modules) are exported for reuse.
"""

from .attention import Attention, convert_legacy_attention_keys
from .embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps
from .normalization import GroupNorm
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D
from .unet_2d import UNet2DModel, UNet2DOutput
from .unet_2d_blocks import (AttnDownBlock2D, AttnUpBlock2D, DownBlock2D, ResnetDownsampleBlock2D,
                             ResnetUpsampleBlock2D, UNetMidBlock2D, UpBlock2D, get_down_block, get_up_block)

from ..utils.lazy import lazy_exports

# exported on first use (utils/lazy.py): name -> submodule
_LAZY = {
    "UNet2DConditionModel": "unet_2d_condition",
    "UNet2DConditionOutput": "unet_2d_condition",
    "Transformer2DModel": "transformer_2d",
    "AutoencoderKL": "autoencoder_kl",
    "VQModel": "vq_model",
    "LDMBertModel": "ldm_bert",
    "PriorTransformer": "prior_transformer",
    "PriorTransformerOutput": "prior_transformer",
    "UnCLIPTextProjModel": "unclip_text_proj",
    "GlideTextEncoder": "glide_text_encoder",
    "GlideTextEncoderOutput": "glide_text_encoder",
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

__all__ = [
    "Attention",
    "AttnDownBlock2D",
    "AttnUpBlock2D",
    "DownBlock2D",
    "Downsample2D",
    "GaussianFourierProjection",
    "GroupNorm",
    "ResnetBlock2D",
    "ResnetDownsampleBlock2D",
    "ResnetUpsampleBlock2D",
    "TimestepEmbedding",
    "Timesteps",
    "UNet2DModel",
    "UNet2DOutput",
    "UNetMidBlock2D",
    "UpBlock2D",
    "Upsample2D",
    "convert_legacy_attention_keys",
    "get_down_block",
    "get_up_block", *_LAZY]
