"""VQModel: the vector-quantised image autoencoder of latent diffusion (the LDM "VQ-f4" first stage).

The encoder maps an image to continuous latents; the decoder first snaps each latent vector
to its nearest entry of a learned codebook (VQ-VAE, van den Oord et al. 2017,
arXiv:1711.00937, Sec. 3.1; the convolutional VQGAN body of Esser et al. 2021,
arXiv:2012.09841), then decodes. Latent diffusion (Rombach et al. 2022, arXiv:2112.10752,
Sec. 3.1) trains on the unquantised latents and quantises inside the decoder:

    encode   h      = quant_conv(Encoder(x))                  (B, D, h, w), D = vq_embed_dim
    decode   z_q    = e_k, k = argmin_j ||h - e_j||            VectorQuantizer, per position
             x_hat  = Decoder(post_quant_conv(z_q))            (B, C_out, H, W)

The quantiser also returns the VQ-VAE loss ||sg[h] - z_q||^2 + beta ||h - sg[z_q]||^2 (Eq. 3;
sg = stop-gradient) and passes gradients straight through z_q to h. Config keys, defaults,
parameter names and outputs match diffusers' ``VQModel``. Limits: ``norm_type="spatial"``
(MoVQ) raises NotImplementedError; the quantiser's index ``remap`` (a .npy file) is not
supported.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..configuration import register_to_config
from ..modeling import ModelMixin
from ..utils.outputs import BaseOutput
from .attention import convert_legacy_attention_keys
from .layout import memory_format_of
from .unet_2d_checks import check_index_range
from .vae import Decoder, DecoderOutput, Encoder, check_image, check_positive_int


@dataclasses.dataclass
class VQEncoderOutput(BaseOutput):
    """Output of :meth:`VQModel.encode`: the unquantised ``latents`` (B, vq_embed_dim, h, w)."""

    latents: torch.Tensor


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantisation of (B, D, h, w) latents with the VQ-VAE loss.

    Args:
        n_e: K, the number of codebook entries.
        vq_embed_dim: D, the width of an entry (the latents' channel count).
        beta: commitment weight of the VQ-VAE loss (van den Oord et al. 2017, Eq. 3).
        remap: must be None (index remapping to a used subset is not supported).
        unknown_index: recorded for diffusers' signature; only meaningful with ``remap``.
        sane_index_shape: return the indices as (B, h, w) rather than flat (B*h*w,).
        legacy: apply beta to the codebook term instead of the commitment term, as the
            original taming-transformers code did (and as checkpoints were trained); only the
            gradients differ, not the loss value.
    """

    def __init__(self, n_e: int, vq_embed_dim: int, beta: float, remap: str | None = None,
                 unknown_index: str | int = "random", sane_index_shape: bool = False, legacy: bool = True) -> None:
        super().__init__()
        if remap is not None:
            raise NotImplementedError("VectorQuantizer: remap (a .npy list of used codebook indices) is not "
                                      "supported by fusediff; pass remap=None")
        check_positive_int("VectorQuantizer", "n_e", n_e)
        check_positive_int("VectorQuantizer", "vq_embed_dim", vq_embed_dim)
        self.n_e, self.vq_embed_dim, self.beta, self.legacy = n_e, vq_embed_dim, beta, legacy
        self.remap, self.unknown_index, self.re_embed = None, unknown_index, n_e
        self.sane_index_shape = sane_index_shape
        self.embedding = nn.Embedding(n_e, vq_embed_dim)  # the codebook e_1..e_K, (K, D)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[None, None, torch.Tensor]]:
        """(z_q (B, D, h, w), loss (), (None, None, indices)) for latents z (B, D, h, w).

        indices are (B*h*w,) int64 in (b, y, x) order, or (B, h, w) with ``sane_index_shape``;
        the two Nones stand where diffusers returns (perplexity, one-hot encodings), also None.
        """
        check_image(z, self.vq_embed_dim, 1, "VectorQuantizer input")
        layout = memory_format_of(z)  # z_q is returned in z's layout (a view of (B, h, w, D) when channels-last)
        z = z.permute(0, 2, 3, 1).contiguous()  # (B, h, w, D)
        flat = z.view(-1, self.vq_embed_dim)  # (B*h*w, D)
        indices = torch.argmin(torch.cdist(flat, self.embedding.weight), dim=1)  # (B*h*w,) nearest e_k
        z_q = self.embedding(indices).view(z.shape)  # (B, h, w, D)
        codebook = torch.mean((z_q - z.detach()) ** 2)  # moves e_k towards the encoder output
        commitment = torch.mean((z_q.detach() - z) ** 2)  # keeps the encoder output near e_k
        loss = commitment + self.beta * codebook if self.legacy else self.beta * commitment + codebook
        z_q = z + (z_q - z).detach()  # straight-through estimator: dz_q/dz = I
        z_q = z_q.permute(0, 3, 1, 2).contiguous(memory_format=layout)  # (B, D, h, w)
        if self.sane_index_shape:
            indices = indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, int, int, int] | None) -> torch.Tensor:
        """Codebook vectors for integer ``indices``: (B, D, h, w) for ``shape`` = (B, h, w, D), else (N, D)."""
        check_index_range(indices, self.n_e, "VectorQuantizer: codebook")
        z_q = self.embedding(indices)  # (..., D)
        if shape is None:
            return z_q
        return z_q.view(shape).permute(0, 3, 1, 2).contiguous()  # (B, h, w, D) -> (B, D, h, w)


class VQModel(ModelMixin):
    """Image (B, in_channels, H, W) <-> latents (B, vq_embed_dim, H/f, W/f), f = 2^(L-1), quantised on decode.

    Args (diffusers' names and defaults):
        in_channels, out_channels: channels of the image in and out.
        down_block_types, up_block_types: ``"DownEncoderBlock2D"`` / ``"UpDecoderBlock2D"``, one per level.
        block_out_channels: encoder width at each level, highest resolution first (L levels).
        layers_per_block: residual blocks per encoder level (decoder levels get one more).
        act_fn: activation of the residual blocks.
        latent_channels: channels of the encoder output and the decoder input.
        sample_size: image size the model was trained at (recorded).
        num_vq_embeddings: K, the codebook size.
        norm_num_groups: GroupNorm groups.
        vq_embed_dim: D, the width of a codebook entry; ``latent_channels`` when None.
        scaling_factor: latent scale for pipelines (recorded, not applied here).
        norm_type: ``"group"`` (``"spatial"`` raises NotImplementedError).
        mid_block_add_attention: self-attention in the encoder's and decoder's mid blocks.
        lookup_from_codebook: with ``force_not_quantize``, :meth:`decode` takes codebook indices.
        force_upcast: tells pipelines to run this model in float32.
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
                 up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",), block_out_channels: tuple[int, ...] = (64,),
                 layers_per_block: int = 1, act_fn: str = "silu", latent_channels: int = 3, sample_size: int = 32,
                 num_vq_embeddings: int = 256, norm_num_groups: int = 32, vq_embed_dim: int | None = None,
                 scaling_factor: float = 0.18215, norm_type: str = "group", mid_block_add_attention: bool = True,
                 lookup_from_codebook: bool = False, force_upcast: bool = False) -> None:
        super().__init__()
        for key in ("latent_channels", "num_vq_embeddings", "vq_embed_dim"):
            check_positive_int("VQModel", key, self.config[key], optional=key == "vq_embed_dim")
        self.encoder = Encoder(in_channels=in_channels, out_channels=latent_channels,
                               down_block_types=down_block_types, block_out_channels=block_out_channels,
                               layers_per_block=layers_per_block, act_fn=act_fn, norm_num_groups=norm_num_groups,
                               double_z=False, mid_block_add_attention=mid_block_add_attention)
        vq_embed_dim = latent_channels if vq_embed_dim is None else vq_embed_dim
        self.quant_conv = nn.Conv2d(latent_channels, vq_embed_dim, 1)
        self.quantize = VectorQuantizer(num_vq_embeddings, vq_embed_dim, beta=0.25, remap=None,
                                        sane_index_shape=False)
        self.post_quant_conv = nn.Conv2d(vq_embed_dim, latent_channels, 1)
        self.decoder = Decoder(in_channels=latent_channels, out_channels=out_channels, up_block_types=up_block_types,
                               block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                               act_fn=act_fn, norm_num_groups=norm_num_groups, norm_type=norm_type,
                               mid_block_add_attention=mid_block_add_attention)

    @classmethod
    def convert_state_dict(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoints of the old ``AttentionBlock`` (query/key/value/proj_attn) load under today's names."""
        return convert_legacy_attention_keys(state)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> VQEncoderOutput | tuple:
        """Unquantised latents of images x (B, in_channels, H, W); :class:`VQEncoderOutput` or ``(latents,)``."""
        check_image(x, self.config.in_channels, self.encoder.min_size, "VQModel.encode: x")
        h = self.quant_conv(self.encoder(x))  # (B, D, h, w)
        return VQEncoderOutput(latents=h) if return_dict else (h,)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False, return_dict: bool = True,
               shape: tuple[int, int, int, int] | None = None) -> DecoderOutput | tuple:
        """Quantise latents h (B, D, h, w) and decode them.

        With ``force_not_quantize`` h is decoded as it is, or, when the config sets
        ``lookup_from_codebook``, h holds codebook indices that are looked up first (``shape``
        = (B, h, w, D) arranges them). Returns :class:`DecoderOutput` (``sample``, ``commit_loss``)
        or the tuple ``(sample, commit_loss)``; the loss is a per-sample zero when not quantising.
        """
        if force_not_quantize and self.config.lookup_from_codebook:
            quant = self.quantize.get_codebook_entry(h, shape)
        else:
            check_image(h, self.quantize.vq_embed_dim, 1, "VQModel.decode: h")
            quant = h
        if force_not_quantize:
            commit_loss = torch.zeros(h.shape[0], device=h.device, dtype=quant.dtype)
        else:
            quant, commit_loss, _ = self.quantize(h)
        dec = self.decoder(self.post_quant_conv(quant))  # (B, C_out, H, W)
        return DecoderOutput(sample=dec, commit_loss=commit_loss) if return_dict else (dec, commit_loss)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Reconstruct ``sample`` through the quantised latents: :class:`DecoderOutput` or ``(sample, commit_loss)``."""
        dec = self.decode(self.encode(sample).latents)
        return dec if return_dict else (dec.sample, dec.commit_loss)
