"""AutoencoderKL: the KL-regularised image autoencoder of latent diffusion (Stable Diffusion's VAE).

Rombach et al. 2022 (arXiv:2112.10752, Sec. 3.1, Appendix G) compress an image x (B, 3, H, W)
into latents z (B, 4, H/f, W/f), f = 2^(L-1), with an encoder that outputs a diagonal Gaussian
q(z|x) (a VAE, Kingma & Welling 2014, arXiv:1312.6114) whose KL to N(0, I) is weighted very
lightly in training, and a decoder p(x|z):

    moments = quant_conv(Encoder(x))          (B, 2 C_lat, h, w) = [mu, log sigma^2]
    z       ~ q(z|x) = N(mu, sigma^2)         DiagonalGaussianDistribution; mode() = mu
    x_hat   = Decoder(post_quant_conv(z))     (B, C_out, H, W)

Diffusion runs on ``z * scaling_factor`` (Sec. 4.3.2, Appendix D.1; ``shift_factor`` and
``latents_mean``/``latents_std`` are the per-model variants of that normalisation). They and
``force_upcast`` are config values for pipelines; the model itself never applies them.

Memory savers, as in diffusers: slicing encodes/decodes one batch element at a time; tiling
runs the encoder/decoder on overlapping tiles (``tile_sample_min_size`` pixels, from the
config's ``sample_size``; ``tile_latent_min_size`` latents; ``tile_overlap_factor`` 0.25) and
blends the overlaps linearly, which reproduces diffusers' tiled output. Config keys, defaults,
parameter names and outputs match diffusers' ``AutoencoderKL``.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..configuration import register_to_config
from ..modeling import ModelMixin
from ..utils.outputs import BaseOutput
from ..utils.torch_utils import Generator
from .attention import convert_legacy_attention_keys
from .unet_2d_checks import is_int
from .vae import Decoder, DecoderOutput, DiagonalGaussianDistribution, Encoder, check_image, check_positive_int


@dataclasses.dataclass
class AutoencoderKLOutput(BaseOutput):
    """Output of :meth:`AutoencoderKL.encode`: the posterior q(z|x) as a :class:`DiagonalGaussianDistribution`."""

    latent_dist: DiagonalGaussianDistribution


def _blend(prev: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> None:
    """Cross-fade the first ``extent`` rows (dim 2) or columns (dim 3) of ``tile`` from ``prev``'s last ones, in place.

    Row y of the overlap becomes prev[-e + y] * (1 - y/e) + tile[y] * (y/e), e the extent
    bounded by both tiles' sizes; the weights are rounded from float64 as Python scalars
    would be, so the result equals diffusers' row-by-row blend.
    """
    extent = min(prev.shape[dim], tile.shape[dim], extent)
    if extent == 0:
        return
    ramp = torch.arange(extent, dtype=torch.float64, device=tile.device) / extent  # y / e
    shape = (extent, 1) if dim == 2 else (extent,)
    w_new, w_old = ramp.to(tile.dtype).view(shape), (1 - ramp).to(tile.dtype).view(shape)
    overlap = tile.narrow(dim, 0, extent)
    overlap.copy_(prev.narrow(dim, prev.shape[dim] - extent, extent) * w_old + overlap * w_new)


def tiled_apply(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], tile_in: int, tile_out: int,
                overlap_factor: float) -> torch.Tensor:
    """``fn`` run over overlapping ``tile_in`` x ``tile_in`` tiles of x (B, C, H, W), outputs blended and stitched.

    Tiles start every ``int(tile_in * (1 - overlap_factor))`` pixels; ``fn`` maps a tile to one
    of at most ``tile_out`` per side. Each output tile is blended with the (already blended)
    tile above it and then the one to its left over ``int(tile_out * overlap_factor)`` rows and
    columns, and its first ``tile_out - that`` rows and columns are kept.
    """
    stride = int(tile_in * (1 - overlap_factor))
    extent = int(tile_out * overlap_factor)
    keep = tile_out - extent
    rows = [[fn(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)]
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                _blend(rows[i - 1][j], tile, extent, dim=2)
            if j > 0:
                _blend(row[j - 1], tile, extent, dim=3)
    return torch.cat([torch.cat([tile[:, :, :keep, :keep] for tile in row], dim=3) for row in rows], dim=2)


def _check_config(config) -> None:
    """ValueError naming the first AutoencoderKL-only config key that is malformed (the rest: Encoder/Decoder)."""
    latent = config["latent_channels"]
    check_positive_int("AutoencoderKL", "latent_channels", latent)
    size = config["sample_size"]
    sizes = list(size) if isinstance(size, Sequence) and not isinstance(size, str) else [size]
    for s in sizes or [None]:
        check_positive_int("AutoencoderKL", "sample_size", s)
    for key, optional in (("scaling_factor", False), ("shift_factor", True)):
        value = config[key]
        if not (optional and value is None) and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise ValueError(f"{key} must be a number{' or None' if optional else ''}; got {value!r}")
    for key in ("latents_mean", "latents_std"):
        value = config[key]
        if value is not None and (isinstance(value, str) or not isinstance(value, Sequence) or len(value) != latent):
            raise ValueError(f"{key} must be None or a list of latent_channels={latent} numbers; got {value!r}")


class AutoencoderKL(ModelMixin):
    """Image (B, in_channels, H, W) <-> latent distribution (B, latent_channels, H/f, W/f), f = 2^(L-1).

    Args (diffusers' names and defaults):
        in_channels, out_channels: channels of the image in and out.
        down_block_types, up_block_types: ``"DownEncoderBlock2D"`` / ``"UpDecoderBlock2D"``, one per level.
        block_out_channels: encoder width at each level, highest resolution first (L levels).
        layers_per_block: residual blocks per encoder level (decoder levels get one more).
        act_fn: activation of the residual blocks.
        latent_channels: C_lat.
        norm_num_groups: GroupNorm groups.
        sample_size: image size the model was trained at; the tile size when tiling.
        scaling_factor, shift_factor, latents_mean, latents_std: latent normalisation for pipelines.
        force_upcast: tells pipelines to run this VAE in float32.
        use_quant_conv, use_post_quant_conv: 1x1 convs after the encoder / before the decoder.
        mid_block_add_attention: self-attention in the encoder's and decoder's mid blocks.
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
                 up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",), block_out_channels: tuple[int, ...] = (64,),
                 layers_per_block: int = 1, act_fn: str = "silu", latent_channels: int = 4, norm_num_groups: int = 32,
                 sample_size: int = 32, scaling_factor: float = 0.18215, shift_factor: float | None = None,
                 latents_mean: tuple[float, ...] | None = None, latents_std: tuple[float, ...] | None = None,
                 force_upcast: bool = True, use_quant_conv: bool = True, use_post_quant_conv: bool = True,
                 mid_block_add_attention: bool = True) -> None:
        super().__init__()
        _check_config(self.config)
        self.encoder = Encoder(in_channels=in_channels, out_channels=latent_channels,
                               down_block_types=down_block_types, block_out_channels=block_out_channels,
                               layers_per_block=layers_per_block, act_fn=act_fn, norm_num_groups=norm_num_groups,
                               double_z=True, mid_block_add_attention=mid_block_add_attention)
        self.decoder = Decoder(in_channels=latent_channels, out_channels=out_channels, up_block_types=up_block_types,
                               block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                               norm_num_groups=norm_num_groups, act_fn=act_fn,
                               mid_block_add_attention=mid_block_add_attention)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

        # runtime memory savers (never saved in the config)
        self.use_slicing = False
        self.use_tiling = False
        size = sample_size[0] if isinstance(sample_size, Sequence) else sample_size
        self.tile_sample_min_size = int(size)
        self.tile_latent_min_size = int(size / 2 ** (len(block_out_channels) - 1))
        self.tile_overlap_factor = 0.25

    @classmethod
    def convert_state_dict(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoints of the old ``AttentionBlock`` (query/key/value/proj_attn) load under today's names."""
        return convert_legacy_attention_keys(state)

    # -- memory savers ----------------------------------------------------------------------------

    def enable_slicing(self) -> None:
        """Encode and decode one batch element at a time (same result, less peak memory)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        """Encode and decode the whole batch at once (the default)."""
        self.use_slicing = False

    def enable_tiling(self, tile_sample_min_size: int | None = None, tile_overlap_factor: float | None = None) -> None:
        """Encode images larger than ``tile_sample_min_size`` (and decode latents larger than
        ``tile_latent_min_size``) in overlapping tiles. Without arguments the sizes follow the
        config's ``sample_size``, as in diffusers; ``tile_sample_min_size`` also sets the latent
        tile size to ``int(tile_sample_min_size / f)``."""
        if tile_sample_min_size is not None:
            if not is_int(tile_sample_min_size):
                raise ValueError(f"tile_sample_min_size must be an int; got {tile_sample_min_size!r}")
            self.tile_sample_min_size = int(tile_sample_min_size)
            self.tile_latent_min_size = int(tile_sample_min_size / 2 ** (len(self.config.block_out_channels) - 1))
        if tile_overlap_factor is not None:
            self.tile_overlap_factor = tile_overlap_factor
        self._check_tiling()
        self.use_tiling = True

    def disable_tiling(self) -> None:
        """Encode and decode in one piece (the default)."""
        self.use_tiling = False

    def _check_tiling(self) -> None:
        """ValueError unless the tile sizes and overlap give tiles that advance and keep at least one pixel."""
        sample, latent, overlap = self.tile_sample_min_size, self.tile_latent_min_size, self.tile_overlap_factor
        if not isinstance(overlap, numbers.Real) or isinstance(overlap, bool) or not 0 <= overlap < 1:
            raise ValueError(f"tile_overlap_factor must be a number in [0, 1); got {overlap!r}")
        for name, size in (("tile_sample_min_size", sample), ("tile_latent_min_size", latent)):
            if not is_int(size) or int(size * (1 - overlap)) < 1:
                raise ValueError(f"{name}={size!r} with tile_overlap_factor={overlap} gives tiles that do not "
                                 f"advance; it must be an int >= {int(1 / (1 - overlap)) + 1} (the latent tile is "
                                 f"the sample tile / {2 ** (len(self.config.block_out_channels) - 1)})")

    def _batched(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``fn(x)``, or with slicing on, ``fn`` on each batch element and the results concatenated."""
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([fn(one) for one in x.split(1)])
        return fn(x)

    # -- encode / decode ---------------------------------------------------------------------------

    def _encode_tile(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, 2 C_lat, h, w)
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Moments [mu, log sigma^2] (B, 2 C_lat, h, w), tiled when tiling is on and x exceeds one tile."""
        if self.use_tiling and (x.shape[2] > self.tile_sample_min_size or x.shape[3] > self.tile_sample_min_size):
            return self._tiled_encode(x)
        return self._encode_tile(x)

    def _tiled_encode(self, x: torch.Tensor) -> torch.Tensor:
        """Moments (B, 2 C_lat, h, w) from overlapping ``tile_sample_min_size`` tiles of x, blended."""
        self._check_tiling()
        return tiled_apply(x, self._encode_tile, self.tile_sample_min_size, self.tile_latent_min_size,
                           self.tile_overlap_factor)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Encode images x (B, in_channels, H, W) into q(z|x): :class:`AutoencoderKLOutput` or ``(latent_dist,)``."""
        check_image(x, self.config.in_channels, self.encoder.min_size, "AutoencoderKL.encode: x")
        posterior = DiagonalGaussianDistribution(self._batched(x, self._encode))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def tiled_encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """:meth:`encode` through tiles whatever the image size (diffusers' public ``tiled_encode``)."""
        check_image(x, self.config.in_channels, self.encoder.min_size, "AutoencoderKL.tiled_encode: x")
        posterior = DiagonalGaussianDistribution(self._tiled_encode(x))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:  # (B, C_lat, h, w) -> (B, C_out, H, W)
        z = self.post_quant_conv(z) if self.post_quant_conv is not None else z
        return self.decoder(z)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and (z.shape[2] > self.tile_latent_min_size or z.shape[3] > self.tile_latent_min_size):
            return self._tiled_decode(z)
        return self._decode_tile(z)

    def _tiled_decode(self, z: torch.Tensor) -> torch.Tensor:
        self._check_tiling()
        return tiled_apply(z, self._decode_tile, self.tile_latent_min_size, self.tile_sample_min_size,
                           self.tile_overlap_factor)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Generator = None) -> DecoderOutput | tuple:
        """Decode latents z (B, latent_channels, h, w) into images; ``generator`` is accepted for
        diffusers' signature and unused (decoding is deterministic). Returns :class:`DecoderOutput` or ``(sample,)``."""
        check_image(z, self.config.latent_channels, 1, "AutoencoderKL.decode: z")
        decoded = self._batched(z, self._decode)
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)

    def tiled_decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """:meth:`decode` through tiles whatever the latent size."""
        check_image(z, self.config.latent_channels, 1, "AutoencoderKL.tiled_decode: z")
        decoded = self._tiled_decode(z)
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: Generator = None) -> DecoderOutput | tuple:
        """Reconstruct ``sample``: decode z = a draw from q(z|x) (``sample_posterior``, seeded by
        ``generator``) or its mode mu. Returns :class:`DecoderOutput` or ``(sample,)``."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        decoded = self.decode(z).sample
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)
