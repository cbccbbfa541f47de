"""Encoder, decoder and latent distribution shared by :class:`AutoencoderKL` and :class:`VQModel`.

The first-stage autoencoder of latent diffusion (Rombach et al. 2022, arXiv:2112.10752,
Sec. 3.1 and Appendix G), whose convolutional body is the VQGAN's (Esser et al. 2021,
arXiv:2012.09841, after the VQ-VAE of van den Oord et al. 2017, arXiv:1711.00937):

    Encoder   x (B, C_in, H, W) -> conv_in -> down blocks (H / 2^(L-1)) -> mid block -> GroupNorm+SiLU -> conv_out
    Decoder   z (B, C_lat, h, w) -> conv_in -> mid block -> up blocks (h * 2^(L-1)) -> GroupNorm+SiLU -> conv_out

where L = len(block_out_channels) and the mid block is resnet, self-attention (one head over
all channels), resnet. With ``double_z`` the encoder outputs the mean and log-variance of a
diagonal Gaussian posterior q(z|x) (Kingma & Welling 2014, arXiv:1312.6114, Sec. 2.4 and
Appendix B): :class:`DiagonalGaussianDistribution` samples it with the reparameterisation
z = mu + sigma * eps and gives its KL divergence to N(0, I).

Module and parameter names match diffusers' ``Encoder``/``Decoder`` (``conv_in``,
``down_blocks``, ``mid_block``, ``up_blocks``, ``conv_norm_out``, ``conv_out``); every
GroupNorm that is followed by SiLU runs as one fused op. Limits: only the
``DownEncoderBlock2D``/``UpDecoderBlock2D`` block types and the group norm (``norm_type="group"``;
``"spatial"`` raises NotImplementedError); no gradient checkpointing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..utils.outputs import BaseOutput
from ..utils.torch_utils import Generator, randn_tensor
from .activations import check_activation
from .normalization import GroupNorm
from .unet_2d_blocks import UNetMidBlock2D
from .unet_2d_checks import is_int
from .vae_blocks import DECODER_BLOCK_TYPES, ENCODER_BLOCK_TYPES, DownEncoderBlock2D, UpDecoderBlock2D

NORM_TYPES = ("group", "spatial")


@dataclasses.dataclass
class DecoderOutput(BaseOutput):
    """Output of a decoder: ``sample`` (B, C_out, H, W), and for :class:`VQModel` the ``commit_loss``."""

    sample: torch.Tensor
    commit_loss: torch.Tensor | None = None


def check_positive_int(owner: str, key: str, value, optional: bool = False) -> None:
    """ValueError naming ``owner`` and ``key`` unless ``value`` is a positive int (or None when ``optional``)."""
    if (value is None and optional) or (is_int(value) and value >= 1):
        return
    raise ValueError(f"{owner}: {key} must be a positive int{' or None' if optional else ''}; got {value!r}")


def check_autoencoder_args(owner: str, *, in_channels: int, out_channels: int, block_types: Sequence[str],
                           supported: Sequence[str], block_out_channels: Sequence[int], layers_per_block: int,
                           norm_num_groups: int, act_fn: str, types_key: str) -> None:
    """Raise ValueError naming the first argument of an encoder or decoder that cannot build a working one."""
    for key, value in (("in_channels", in_channels), ("out_channels", out_channels),
                       ("layers_per_block", layers_per_block), ("norm_num_groups", norm_num_groups)):
        check_positive_int(owner, key, value)
    if isinstance(block_out_channels, str) or not isinstance(block_out_channels, Sequence) \
            or not block_out_channels or not all(is_int(c) and c > 0 for c in block_out_channels):
        raise ValueError(f"{owner}: block_out_channels must be a non-empty list of positive ints; "
                         f"got {block_out_channels!r}")
    if isinstance(block_types, str) or not isinstance(block_types, Sequence) \
            or len(block_types) != len(block_out_channels):
        raise ValueError(f"{owner}: {types_key} must list one block type per entry of block_out_channels "
                         f"({len(block_out_channels)}); got {block_types!r}")
    for block_type in block_types:
        if block_type not in supported:
            raise ValueError(f"{owner}: block type {block_type!r} in {types_key} is not supported by fusediff "
                             f"(supported: {', '.join(supported)})")
    bad = [c for c in block_out_channels if c % norm_num_groups]
    if bad:
        raise ValueError(f"{owner}: norm_num_groups={norm_num_groups} must divide every entry of "
                         f"block_out_channels; {', '.join(map(str, bad))} is not divisible")
    check_activation(act_fn)


def check_image(x: torch.Tensor, channels: int, min_size: int, what: str) -> None:
    """TypeError/ValueError unless ``x`` is a float (B, channels, H, W) tensor with B >= 1 and H, W >= ``min_size``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor; got {x.dtype}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{what} must have shape (B, {channels}, H, W); got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{what} has an empty batch")
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(f"{what} height and width must be at least {min_size}; got {tuple(x.shape[2:])}")


def _mid_block(channels: int, act_fn: str, norm_num_groups: int, add_attention: bool) -> UNetMidBlock2D:
    """Resnet, single-head self-attention over all ``channels``, resnet; no time embedding."""
    return UNetMidBlock2D(in_channels=channels, temb_channels=None, resnet_eps=1e-6, resnet_act_fn=act_fn,
                          output_scale_factor=1, resnet_time_scale_shift="default", attention_head_dim=channels,
                          resnet_groups=norm_num_groups, add_attention=add_attention)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> (B, out_channels or 2 out_channels, H / 2^(L-1), W / 2^(L-1)).

    Args:
        in_channels: channels of the image.
        out_channels: latent channels; the output has twice as many with ``double_z``.
        down_block_types: one ``"DownEncoderBlock2D"`` per entry of ``block_out_channels``.
        block_out_channels: width at each resolution, highest resolution first.
        layers_per_block: residual blocks per resolution.
        norm_num_groups: GroupNorm groups everywhere (epsilon 1e-6).
        act_fn: activation of the residual blocks (the output norm is always followed by SiLU).
        double_z: output the mean and log-variance of q(z|x) rather than z.
        mid_block_add_attention: whether the mid block has self-attention.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 down_block_types: Sequence[str] = ("DownEncoderBlock2D",), block_out_channels: Sequence[int] = (64,),
                 layers_per_block: int = 2, norm_num_groups: int = 32, act_fn: str = "silu", double_z: bool = True,
                 mid_block_add_attention: bool = True) -> None:
        super().__init__()
        check_autoencoder_args("Encoder", in_channels=in_channels, out_channels=out_channels,
                               block_types=down_block_types, supported=ENCODER_BLOCK_TYPES,
                               block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                               norm_num_groups=norm_num_groups, act_fn=act_fn, types_key="down_block_types")
        channels = list(block_out_channels)
        self.layers_per_block = layers_per_block
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, stride=1, padding=1)
        self.down_blocks = nn.ModuleList()
        for i in range(len(channels)):
            self.down_blocks.append(DownEncoderBlock2D(
                in_channels=channels[max(i - 1, 0)], out_channels=channels[i], num_layers=layers_per_block,
                resnet_eps=1e-6, resnet_act_fn=act_fn, resnet_groups=norm_num_groups,
                add_downsample=i < len(channels) - 1, downsample_padding=0))
        self.mid_block = _mid_block(channels[-1], act_fn, norm_num_groups, mid_block_add_attention)
        self.conv_norm_out = GroupNorm(norm_num_groups, channels[-1], eps=1e-6, activation="silu")
        self.conv_out = nn.Conv2d(channels[-1], 2 * out_channels if double_z else out_channels, 3, padding=1)
        self.min_size = 2 ** (len(channels) - 1)  # each stride-2 conv (padded to H + 1) needs H >= 2

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        check_image(sample, self.conv_in.in_channels, self.min_size, "Encoder input")
        h = self.conv_in(sample)  # (B, C_0, H, W)
        for block in self.down_blocks:
            h = block(h)  # (B, C_i, H / 2^i, W / 2^i)
        h = self.mid_block(h)  # (B, C_{L-1}, h, w)
        return self.conv_out(self.conv_norm_out(h))  # (B, [2] C_lat, h, w)


class Decoder(nn.Module):
    """Latents (B, in_channels, h, w) -> image (B, out_channels, h 2^(L-1), w 2^(L-1)).

    Args are those of :class:`Encoder` (``up_block_types`` lists ``"UpDecoderBlock2D"``, each
    with ``layers_per_block + 1`` residual blocks, lowest resolution first), plus
    ``norm_type``: ``"group"`` (``"spatial"``, MoVQ's latent-conditioned norm, raises
    NotImplementedError).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 up_block_types: Sequence[str] = ("UpDecoderBlock2D",), block_out_channels: Sequence[int] = (64,),
                 layers_per_block: int = 2, norm_num_groups: int = 32, act_fn: str = "silu", norm_type: str = "group",
                 mid_block_add_attention: bool = True) -> None:
        super().__init__()
        if norm_type == "spatial":
            raise NotImplementedError("Decoder: norm_type='spatial' (the MoVQ decoder's latent-conditioned "
                                      "SpatialNorm) is not implemented in fusediff; use norm_type='group'")
        if norm_type not in NORM_TYPES:
            raise ValueError(f"Decoder: norm_type must be one of {', '.join(NORM_TYPES)}; got {norm_type!r}")
        check_autoencoder_args("Decoder", in_channels=in_channels, out_channels=out_channels,
                               block_types=up_block_types, supported=DECODER_BLOCK_TYPES,
                               block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                               norm_num_groups=norm_num_groups, act_fn=act_fn, types_key="up_block_types")
        reversed_channels = list(block_out_channels)[::-1]
        self.layers_per_block = layers_per_block
        self.conv_in = nn.Conv2d(in_channels, reversed_channels[0], kernel_size=3, stride=1, padding=1)
        self.up_blocks = nn.ModuleList()  # registered before mid_block, built after it: diffusers' key and init order
        self.mid_block = _mid_block(reversed_channels[0], act_fn, norm_num_groups, mid_block_add_attention)
        for i in range(len(reversed_channels)):
            self.up_blocks.append(UpDecoderBlock2D(
                in_channels=reversed_channels[max(i - 1, 0)], out_channels=reversed_channels[i],
                num_layers=layers_per_block + 1, resnet_eps=1e-6, resnet_act_fn=act_fn,
                resnet_groups=norm_num_groups, add_upsample=i < len(reversed_channels) - 1))
        self.conv_norm_out = GroupNorm(norm_num_groups, reversed_channels[-1], eps=1e-6, activation="silu")
        self.conv_out = nn.Conv2d(reversed_channels[-1], out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        check_image(sample, self.conv_in.in_channels, 1, "Decoder input")
        h = self.conv_in(sample)  # (B, C_{L-1}, h, w)
        h = self.mid_block(h)
        for block in self.up_blocks:
            h = block(h)  # (B, C_i, 2x, 2x) except after the last block
        return self.conv_out(self.conv_norm_out(h))  # (B, C_out, H, W)


class DiagonalGaussianDistribution:
    """N(mu, diag(sigma^2)) over latents, from encoder ``parameters`` (B, 2C, h, w) = [mu, log sigma^2].

    The posterior q(z|x) of the KL-regularised autoencoder (Kingma & Welling 2014, Sec. 2.4;
    Rombach et al. 2022, Sec. 3.1). The log-variance is clamped to [-30, 20] as in the LDM
    code; ``deterministic`` makes sigma zero (a point mass at mu).
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        if not isinstance(parameters, torch.Tensor) or parameters.dim() < 2 or parameters.shape[1] % 2:
            shape = tuple(parameters.shape) if isinstance(parameters, torch.Tensor) else type(parameters).__name__
            raise ValueError("DiagonalGaussianDistribution: parameters must be a (B, 2C, ...) tensor holding the "
                             f"mean and log-variance along dim 1; got {shape}")
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)  # (B, C, h, w) each
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: Generator = None) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I) drawn as diffusers draws it (same generator, same z)."""
        eps = randn_tensor(self.mean.shape, generator=generator, device=self.parameters.device,
                           dtype=self.parameters.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The most likely latent, mu."""
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """(B,) KL(self || other), summed over (C, h, w); ``other`` defaults to N(0, I)."""
        if self.deterministic:
            return torch.zeros(1, device=self.mean.device, dtype=self.mean.dtype)
        dims = list(range(1, self.mean.dim()))
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=dims)

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """-log N(sample; mu, sigma^2), summed over ``dims``."""
        if self.deterministic:
            return torch.zeros(1, device=self.mean.device, dtype=self.mean.dtype)
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var,
                               dim=list(dims))
