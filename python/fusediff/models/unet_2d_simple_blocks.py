"""The added-KV cross-attention blocks of the pixel-space text-to-image UNets (DeepFloyd IF, unCLIP).

A "simple" cross-attention block is an ADM block (Dhariwal & Nichol 2021, arXiv:2105.05233,
Sec. 3: residual resampling, scale-shift norms) whose attention after each residual block is
:class:`~fusediff.models.attention_added_kv.AddedKVAttention`: the feature map attends to itself and
to the projected text tokens in one softmax, as in GLIDE (Nichol et al. 2021, arXiv:2112.10741,
Sec. 4). The down block keeps each output for the skip connections and halves the resolution with a
residual block (``down=True``: average pooling inside it); the up block concatenates the skips and
doubles it with a residual block (``up=True``: nearest 2x inside it, which ignores ``upsample_size``,
as in diffusers); the mid block is resnet, attention, resnet.

Unlike the transformer blocks, ``attention_head_dim`` is the WIDTH of a head here, so a block has
``channels // attention_head_dim`` heads (diffusers' convention for these blocks). The attention's
GroupNorm has the resnets' groups and eps 1e-5 (diffusers does not pass the resnets' eps). The blocks
take an ``attention_mask`` (an additive bias over the context tokens) for their attentions. Module
and parameter names match diffusers' (``resnets``, ``attentions``, ``downsamplers``, ``upsamplers``).
"""

from __future__ import annotations

from torch import nn

from .attention_added_kv import AddedKVAttention
from .unet_2d_blocks import MakeAttention, _DownBlock, _MidBlock, _UpBlock


def _added_kv_attentions(attention_head_dim: int, cross_attention_dim: int, norm_groups: int,
                         only_cross_attention: bool, cross_attention_norm: str | None) -> MakeAttention:
    """The factory of a block's AddedKVAttentions: ``channels // attention_head_dim`` heads of that width."""

    def make(channels: int, index: int) -> nn.Module:
        if not 1 <= attention_head_dim <= channels or channels % attention_head_dim:
            raise ValueError(f"attention_head_dim={attention_head_dim} (the head width of the simple cross-attention "
                             f"blocks) must divide their {channels} channels")
        return AddedKVAttention(channels, heads=channels // attention_head_dim, dim_head=attention_head_dim,
                                added_kv_proj_dim=cross_attention_dim, norm_num_groups=norm_groups,
                                only_cross_attention=only_cross_attention, cross_attention_norm=cross_attention_norm)

    return make


def _opts(dropout, resnet_eps, resnet_time_scale_shift, resnet_act_fn, resnet_groups, output_scale_factor,
          skip_time_act) -> dict:
    """The block-wide resnet options of :mod:`fusediff.models.unet_2d_blocks`."""
    return dict(dropout=dropout, resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups, output_scale_factor=output_scale_factor,
                skip_time_act=skip_time_act)


class SimpleCrossAttnDownBlock2D(_DownBlock):
    """Residual blocks each followed by added-KV attention, then a downsampling residual block (``add_downsample``).

    ``forward(hidden_states, temb, encoder_hidden_states=...)`` returns the output (B, C_out, H', W')
    and the outputs kept for the skip connections.
    """

    has_cross_attention = True
    takes_attention_mask = True  # forward(..., attention_mask=bias over the context tokens)

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default",
                 resnet_act_fn: str = "swish", resnet_groups: int = 32, attention_head_dim: int = 1,
                 cross_attention_dim: int = 1280, output_scale_factor: float = 1.0, add_downsample: bool = True,
                 skip_time_act: bool = False, only_cross_attention: bool = False,
                 cross_attention_norm: str | None = None) -> None:
        make = _added_kv_attentions(attention_head_dim, cross_attention_dim, resnet_groups, only_cross_attention,
                                    cross_attention_norm)
        super().__init__(in_channels, out_channels, temb_channels, num_layers, attention=True, attention_head_dim=None,
                         downsample="resnet" if add_downsample else None, downsample_padding=1, make_attention=make,
                         **_opts(dropout, resnet_eps, resnet_time_scale_shift, resnet_act_fn, resnet_groups,
                                 output_scale_factor, skip_time_act))


class SimpleCrossAttnUpBlock2D(_UpBlock):
    """Residual blocks over the concatenated skips, each followed by added-KV attention, then an upsampling resnet.

    ``forward(hidden_states, res_hidden_states_tuple, temb, upsample_size, encoder_hidden_states=...)``;
    ``upsample_size`` is ignored (the residual upsampler always doubles).
    """

    has_cross_attention = True
    takes_attention_mask = True  # forward(..., attention_mask=bias over the context tokens)

    def __init__(self, in_channels: int, out_channels: int, prev_output_channel: int, temb_channels: int,
                 dropout: float = 0.0, num_layers: int = 1, resnet_eps: float = 1e-6,
                 resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 attention_head_dim: int = 1, cross_attention_dim: int = 1280, output_scale_factor: float = 1.0,
                 add_upsample: bool = True, skip_time_act: bool = False, only_cross_attention: bool = False,
                 cross_attention_norm: str | None = None) -> None:
        make = _added_kv_attentions(attention_head_dim, cross_attention_dim, resnet_groups, only_cross_attention,
                                    cross_attention_norm)
        super().__init__(in_channels, prev_output_channel, out_channels, temb_channels, num_layers, attention=True,
                         attention_head_dim=None, upsample="resnet" if add_upsample else None, make_attention=make,
                         **_opts(dropout, resnet_eps, resnet_time_scale_shift, resnet_act_fn, resnet_groups,
                                 output_scale_factor, skip_time_act))


class UNetMidBlock2DSimpleCrossAttn(_MidBlock):
    """Resnet, then ``num_layers`` x (added-KV attention, resnet), at constant resolution and width."""

    has_cross_attention = True
    takes_attention_mask = True  # forward(..., attention_mask=bias over the context tokens)

    def __init__(self, in_channels: int, temb_channels: int, dropout: float = 0.0, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int | None = 32, attention_head_dim: int = 1, output_scale_factor: float = 1.0,
                 cross_attention_dim: int = 1280, skip_time_act: bool = False, only_cross_attention: bool = False,
                 cross_attention_norm: str | None = None) -> None:
        resnet_groups = resnet_groups if resnet_groups is not None else min(in_channels // 4, 32)
        make = _added_kv_attentions(attention_head_dim, cross_attention_dim, resnet_groups, only_cross_attention,
                                    cross_attention_norm)
        super().__init__(in_channels, temb_channels, num_layers, make,
                         _opts(dropout, resnet_eps, resnet_time_scale_shift, resnet_act_fn, resnet_groups,
                               output_scale_factor, skip_time_act))
