"""The per-resolution blocks of the autoencoders' encoder and decoder: residual blocks, then a resampler.

The first-stage autoencoder of latent diffusion (Rombach et al. 2022, arXiv:2112.10752,
Sec. 3 and Appendix G; its convolutional body is the VQGAN's, Esser et al. 2021,
arXiv:2012.09841) is a UNet without skip connections and without a time embedding: each
encoder level runs ``num_layers`` residual blocks and halves the resolution with a stride-2
conv, each decoder level runs its residual blocks and doubles it (nearest neighbour + conv).

Names, signatures and parameter names follow diffusers' ``DownEncoderBlock2D`` and
``UpDecoderBlock2D`` (``resnets``, ``downsamplers.0.conv``, ``upsamplers.0.conv``), so
checkpoints load in both. Only the group-norm variant is built: the spatially conditioned
norm of MoVQ (``resnet_time_scale_shift="spatial"``) raises NotImplementedError.
"""

from __future__ import annotations

import torch
from torch import nn

from .resnet import Downsample2D, ResnetBlock2D, Upsample2D

ENCODER_BLOCK_TYPES = ("DownEncoderBlock2D",)
DECODER_BLOCK_TYPES = ("UpDecoderBlock2D",)


def _check_norm(resnet_time_scale_shift: str, block: str) -> None:
    """Only ``"default"`` (plain GroupNorm, no conditioning) is built for the autoencoder blocks."""
    if resnet_time_scale_shift == "spatial":
        raise NotImplementedError(f"{block}: the spatial norm of MoVQ (resnet_time_scale_shift='spatial') is not "
                                  "implemented in fusediff; use 'default'")
    if resnet_time_scale_shift != "default":
        raise ValueError(f"{block}: resnet_time_scale_shift must be 'default' (the autoencoder has no time "
                         f"embedding to scale and shift by); got {resnet_time_scale_shift!r}")


def _resnets(in_channels: int, out_channels: int, num_layers: int, temb_channels: int | None, dropout: float,
             resnet_eps: float, resnet_act_fn: str, resnet_groups: int, output_scale_factor: float) -> nn.ModuleList:
    """``num_layers`` residual blocks, the first mapping ``in_channels`` to ``out_channels``."""
    return nn.ModuleList([
        ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels,
                      temb_channels=temb_channels, eps=resnet_eps, groups=resnet_groups, dropout=dropout,
                      non_linearity=resnet_act_fn, output_scale_factor=output_scale_factor)
        for i in range(num_layers)])


class DownEncoderBlock2D(nn.Module):
    """``num_layers`` residual blocks without time embedding, then a stride-2 conv (when ``add_downsample``).

    Args:
        in_channels, out_channels: channels of the input and of every residual block's output.
        dropout: dropout probability inside the residual blocks.
        num_layers: number of residual blocks.
        resnet_eps, resnet_groups: GroupNorm epsilon and groups.
        resnet_time_scale_shift: ``"default"`` only (see the module docstring).
        resnet_act_fn: activation of the residual blocks.
        output_scale_factor: divides each residual block's output.
        add_downsample: end with a stride-2 3x3 conv.
        downsample_padding: its padding; 0 pads one row and column at the bottom/right instead.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int = 32, output_scale_factor: float = 1.0, add_downsample: bool = True,
                 downsample_padding: int = 1) -> None:
        super().__init__()
        _check_norm(resnet_time_scale_shift, type(self).__name__)
        self.resnets = _resnets(in_channels, out_channels, num_layers, None, dropout, resnet_eps, resnet_act_fn,
                                resnet_groups, output_scale_factor)
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, use_conv=True, out_channels=out_channels,
                                                        padding=downsample_padding)]) if add_downsample else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # (B, C_in, H, W) -> (B, C_out, H', W'), H' = H // 2 with padding 0 or (H - 1) // 2 + 1 with padding 1
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, None)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
        return hidden_states


class UpDecoderBlock2D(nn.Module):
    """``num_layers`` residual blocks, then nearest-neighbour 2x and a 3x3 conv (when ``add_upsample``).

    Args are those of :class:`DownEncoderBlock2D`, plus ``resolution_idx`` (recorded, as in
    diffusers) and ``temb_channels`` (the width of an optional embedding the residual blocks
    add; None in the autoencoders).
    """

    def __init__(self, in_channels: int, out_channels: int, resolution_idx: int | None = None, dropout: float = 0.0,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default",
                 resnet_act_fn: str = "swish", resnet_groups: int = 32, output_scale_factor: float = 1.0,
                 add_upsample: bool = True, temb_channels: int | None = None) -> None:
        super().__init__()
        _check_norm(resnet_time_scale_shift, type(self).__name__)
        self.resnets = _resnets(in_channels, out_channels, num_layers, temb_channels, dropout, resnet_eps,
                                resnet_act_fn, resnet_groups, output_scale_factor)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)
                                         ]) if add_upsample else None
        self.resolution_idx = resolution_idx

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # (B, C_in, H, W) -> (B, C_out, 2H, 2W)
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states
