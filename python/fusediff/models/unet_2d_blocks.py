"""The down, middle and up blocks of the DDPM-family UNet, and the factories that build them by name.

A down block runs ``num_layers`` residual blocks (each optionally followed by self-attention)
at one resolution, then halves it; every intermediate output is kept for the skip connections.
An up block concatenates one kept output to its input before each residual block, then doubles
the resolution. The middle block is resnet, attention, resnet at the lowest resolution. This
is the UNet of DDPM (Ho et al. 2020, Appendix B; Ronneberger et al. 2015, arXiv:1505.04597),
with the attention placement and residual resampling of ADM (Dhariwal & Nichol 2021,
arXiv:2105.05233, Sec. 3) available through the block types.

Supported block types (diffusers' names; a ``UNetRes`` prefix is accepted and ignored):
``DownBlock2D``, ``AttnDownBlock2D``, ``ResnetDownsampleBlock2D``; ``UpBlock2D``,
``AttnUpBlock2D``, ``ResnetUpsampleBlock2D``; ``UNetMidBlock2D``. The Skip* blocks of NCSN++
(FIR resampling) and the K-diffusion blocks are not supported: asking for them raises
ValueError. The cross-attention blocks of the text-conditioned UNet reuse the private bases
here (``make_attention`` builds their transformers; the extra keyword arguments of ``forward``
reach them) and live in :mod:`fusediff.models.unet_2d_condition_blocks`. Module and parameter
names match diffusers' (``resnets``, ``attentions``, ``downsamplers``, ``upsamplers``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .attention import Attention
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2D",)
RESAMPLE_TYPES = ("conv", "resnet")


def _resnet(in_channels: int, out_channels: int, temb_channels: int, opts: dict, **extra) -> ResnetBlock2D:
    """A ResnetBlock2D with the block-wide options ``opts`` (eps, groups, act, dropout, ...)."""
    return ResnetBlock2D(in_channels=in_channels, out_channels=out_channels, temb_channels=temb_channels,
                         eps=opts["resnet_eps"], groups=opts["resnet_groups"], dropout=opts["dropout"],
                         time_embedding_norm=opts["resnet_time_scale_shift"], non_linearity=opts["resnet_act_fn"],
                         output_scale_factor=opts["output_scale_factor"], skip_time_act=opts["skip_time_act"],
                         **extra)


def _attention(channels: int, attention_head_dim: int | None, norm_groups: int | None, opts: dict) -> Attention:
    """The self-attention after a resnet: ``channels // attention_head_dim`` heads of that width."""
    head_dim = channels if attention_head_dim is None else attention_head_dim
    if head_dim > channels:
        raise ValueError(f"attention_head_dim={head_dim} is larger than the {channels} channels it attends over")
    return Attention(channels, heads=channels // head_dim, dim_head=head_dim, norm_num_groups=norm_groups,
                     eps=opts["resnet_eps"], rescale_output_factor=opts["output_scale_factor"],
                     residual_connection=True, bias=True)


MakeAttention = Callable[[int, int], nn.Module]  # (channels, layer index) -> the attention after that resnet


def _layer_attention(make_attention: MakeAttention | None, channels: int, index: int,
                     attention_head_dim: int | None, opts: dict) -> nn.Module:
    """The attention after resnet ``index``: ``make_attention``'s, or the default spatial self-attention."""
    if make_attention is not None:
        return make_attention(channels, index)
    return _attention(channels, attention_head_dim, opts["resnet_groups"], opts)


class _Block(nn.Module):
    """Base of the blocks: how the i-th attention runs, with the block's extra inputs (a hook for subclasses)."""

    attentions: nn.ModuleList | None

    def _attend(self, index: int, hidden_states: torch.Tensor, inputs: dict) -> torch.Tensor:
        return self.attentions[index](hidden_states, **inputs)


class _DownBlock(_Block):
    """``num_layers`` x (resnet [+ attention]), then an optional conv or resnet downsampler.

    ``make_attention`` builds the attentions (default: spatial self-attention); the keyword
    arguments of ``forward`` beyond ``temb`` go to each attention.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int, *,
                 attention: bool, attention_head_dim: int | None, downsample: str | None, downsample_padding: int,
                 make_attention: MakeAttention | None = None, **opts) -> None:
        super().__init__()
        resnets, attentions = [], []
        for i in range(num_layers):  # created in diffusers' order, so a seeded init matches it
            resnets.append(_resnet(in_channels if i == 0 else out_channels, out_channels, temb_channels, opts))
            if attention:
                attentions.append(_layer_attention(make_attention, out_channels, i, attention_head_dim, opts))
        self.attentions = nn.ModuleList(attentions) if attention else None  # before resnets: diffusers' key order
        self.resnets = nn.ModuleList(resnets)
        self.downsample_type = downsample
        if downsample == "conv":
            down = Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=downsample_padding)
        elif downsample == "resnet":
            down = _resnet(out_channels, out_channels, temb_channels, opts, down=True)
        else:
            down = None
        self.downsamplers = nn.ModuleList([down]) if down is not None else None

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, **attention_inputs
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        # (B, C_in, H, W) -> (B, C_out, H/2, W/2) and the outputs kept for the skip connections
        output_states = ()
        for i, resnet in enumerate(self.resnets):
            hidden_states = resnet(hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self._attend(i, hidden_states, attention_inputs)
            output_states += (hidden_states,)
        if self.downsamplers is not None:
            down = self.downsamplers[0]
            hidden_states = down(hidden_states, temb) if self.downsample_type == "resnet" else down(hidden_states)
            output_states += (hidden_states,)
        return hidden_states, output_states


class DownBlock2D(_DownBlock):
    """Residual blocks, then a stride-2 conv (when ``add_downsample``)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default",
                 resnet_act_fn: str = "swish", resnet_groups: int = 32, output_scale_factor: float = 1.0,
                 add_downsample: bool = True, downsample_padding: int = 1) -> None:
        super().__init__(in_channels, out_channels, temb_channels, num_layers, attention=False,
                         attention_head_dim=None, downsample="conv" if add_downsample else None,
                         downsample_padding=downsample_padding, dropout=dropout, resnet_eps=resnet_eps,
                         resnet_time_scale_shift=resnet_time_scale_shift, resnet_act_fn=resnet_act_fn,
                         resnet_groups=resnet_groups, output_scale_factor=output_scale_factor, skip_time_act=False)


class AttnDownBlock2D(_DownBlock):
    """Residual blocks each followed by self-attention, then a conv or resnet downsampler (or none)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default",
                 resnet_act_fn: str = "swish", resnet_groups: int = 32, attention_head_dim: int | None = 1,
                 output_scale_factor: float = 1.0, downsample_padding: int = 1,
                 downsample_type: str | None = "conv") -> None:
        super().__init__(in_channels, out_channels, temb_channels, num_layers, attention=True,
                         attention_head_dim=attention_head_dim, downsample=downsample_type,
                         downsample_padding=downsample_padding, dropout=dropout, resnet_eps=resnet_eps,
                         resnet_time_scale_shift=resnet_time_scale_shift, resnet_act_fn=resnet_act_fn,
                         resnet_groups=resnet_groups, output_scale_factor=output_scale_factor, skip_time_act=False)


class ResnetDownsampleBlock2D(_DownBlock):
    """Residual blocks, then a residual block that downsamples (BigGAN/ADM style)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default",
                 resnet_act_fn: str = "swish", resnet_groups: int = 32, output_scale_factor: float = 1.0,
                 add_downsample: bool = True, skip_time_act: bool = False) -> None:
        super().__init__(in_channels, out_channels, temb_channels, num_layers, attention=False,
                         attention_head_dim=None, downsample="resnet" if add_downsample else None,
                         downsample_padding=1, dropout=dropout, resnet_eps=resnet_eps,
                         resnet_time_scale_shift=resnet_time_scale_shift, resnet_act_fn=resnet_act_fn,
                         resnet_groups=resnet_groups, output_scale_factor=output_scale_factor,
                         skip_time_act=skip_time_act)


class _UpBlock(_Block):
    """``num_layers`` x (concat skip, resnet [+ attention]), then an optional conv or resnet upsampler.

    ``make_attention`` and the extra keyword arguments of ``forward`` as in ``_DownBlock``.
    """

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 num_layers: int, *, attention: bool, attention_head_dim: int | None, upsample: str | None,
                 make_attention: MakeAttention | None = None, **opts) -> None:
        super().__init__()
        resnets, attentions = [], []
        for i in range(num_layers):  # created in diffusers' order, so a seeded init matches it
            skip_channels = in_channels if i == num_layers - 1 else out_channels  # the kept output it concatenates
            own_channels = prev_output_channel if i == 0 else out_channels
            resnets.append(_resnet(own_channels + skip_channels, out_channels, temb_channels, opts))
            if attention:
                attentions.append(_layer_attention(make_attention, out_channels, i, attention_head_dim, opts))
        self.attentions = nn.ModuleList(attentions) if attention else None  # before resnets: diffusers' key order
        self.resnets = nn.ModuleList(resnets)
        self.upsample_type = upsample
        if upsample == "conv":
            up = Upsample2D(out_channels, use_conv=True, out_channels=out_channels)
        elif upsample == "resnet":
            up = _resnet(out_channels, out_channels, temb_channels, opts, up=True)
        else:
            up = None
        self.upsamplers = nn.ModuleList([up]) if up is not None else None

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor | None = None, upsample_size: tuple[int, int] | None = None,
                **attention_inputs) -> torch.Tensor:
        # (B, C_prev, H, W) + kept outputs (last first) -> (B, C_out, 2H, 2W), or upsample_size when given
        for i, resnet in enumerate(self.resnets):
            skip = res_hidden_states_tuple[-1 - i]
            hidden_states = torch.cat([hidden_states, skip], dim=1)  # (B, C + C_skip, H, W)
            hidden_states = resnet(hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self._attend(i, hidden_states, attention_inputs)
        if self.upsamplers is not None:
            up = self.upsamplers[0]
            hidden_states = up(hidden_states, temb) if self.upsample_type == "resnet" else up(hidden_states,
                                                                                               upsample_size)
        return hidden_states


class UpBlock2D(_UpBlock):
    """Residual blocks over the concatenated skips, then nearest 2x + conv (when ``add_upsample``)."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 dropout: float = 0.0, num_layers: int = 1, resnet_eps: float = 1e-6,
                 resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 output_scale_factor: float = 1.0, add_upsample: bool = True) -> None:
        super().__init__(in_channels, prev_output_channel, out_channels, temb_channels, num_layers, attention=False,
                         attention_head_dim=None, upsample="conv" if add_upsample else None, dropout=dropout,
                         resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                         resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups,
                         output_scale_factor=output_scale_factor, skip_time_act=False)


class AttnUpBlock2D(_UpBlock):
    """Residual blocks each followed by self-attention, then a conv or resnet upsampler (or none)."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 dropout: float = 0.0, num_layers: int = 1, resnet_eps: float = 1e-6,
                 resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 attention_head_dim: int | None = 1, output_scale_factor: float = 1.0,
                 upsample_type: str | None = "conv") -> None:
        super().__init__(in_channels, prev_output_channel, out_channels, temb_channels, num_layers, attention=True,
                         attention_head_dim=attention_head_dim, upsample=upsample_type, dropout=dropout,
                         resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                         resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups,
                         output_scale_factor=output_scale_factor, skip_time_act=False)


class ResnetUpsampleBlock2D(_UpBlock):
    """Residual blocks over the concatenated skips, then a residual block that upsamples."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 dropout: float = 0.0, num_layers: int = 1, resnet_eps: float = 1e-6,
                 resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 output_scale_factor: float = 1.0, add_upsample: bool = True, skip_time_act: bool = False) -> None:
        super().__init__(in_channels, prev_output_channel, out_channels, temb_channels, num_layers, attention=False,
                         attention_head_dim=None, upsample="resnet" if add_upsample else None, dropout=dropout,
                         resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                         resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups,
                         output_scale_factor=output_scale_factor, skip_time_act=skip_time_act)


class _MidBlock(_Block):
    """Resnet, then ``num_layers`` x (``make_attention(in_channels, i)`` if given, resnet), at constant width.

    The extra keyword arguments of ``forward`` go to each attention, as in ``_DownBlock``.
    """

    def __init__(self, in_channels: int, temb_channels: int | None, num_layers: int,
                 make_attention: MakeAttention | None, opts: dict) -> None:
        super().__init__()
        resnets, attentions = [_resnet(in_channels, in_channels, temb_channels, opts)], []
        for i in range(num_layers):  # created in diffusers' order, so a seeded init matches it
            if make_attention is not None:
                attentions.append(make_attention(in_channels, i))
            resnets.append(_resnet(in_channels, in_channels, temb_channels, opts))
        self.attentions = nn.ModuleList(attentions) if make_attention else None  # before resnets: diffusers' order
        self.resnets = nn.ModuleList(resnets)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None,
                **attention_inputs) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)  # (B, C, H, W) throughout
        for i, resnet in enumerate(self.resnets[1:]):
            if self.attentions is not None:
                hidden_states = self._attend(i, hidden_states, attention_inputs)
            hidden_states = resnet(hidden_states, temb)
        return hidden_states


class UNetMidBlock2D(_MidBlock):
    """Resnet, then ``num_layers`` x (self-attention, resnet), at constant resolution and width.

    The attention's GroupNorm has ``attn_groups`` groups; when None, ``resnet_groups`` with the
    default time-embedding norm and no norm at all with ``scale_shift`` (diffusers' rule).
    """

    def __init__(self, in_channels: int, temb_channels: int, dropout: float = 0.0, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int | None = 32, attn_groups: int | None = None, add_attention: bool = True,
                 attention_head_dim: int | None = 1, output_scale_factor: float = 1.0) -> None:
        resnet_groups = resnet_groups if resnet_groups is not None else min(in_channels // 4, 32)
        if attn_groups is None:
            attn_groups = resnet_groups if resnet_time_scale_shift == "default" else None
        opts = dict(resnet_eps=resnet_eps, resnet_groups=resnet_groups, dropout=dropout,
                    resnet_time_scale_shift=resnet_time_scale_shift, resnet_act_fn=resnet_act_fn,
                    output_scale_factor=output_scale_factor, skip_time_act=False)

        def make_attention(channels: int, index: int) -> Attention:
            return _attention(channels, attention_head_dim, attn_groups, opts)

        super().__init__(in_channels, temb_channels, num_layers, make_attention if add_attention else None, opts)
        self.add_attention = add_attention


def _block_name(block_type: str, supported: tuple[str, ...], kind: str, model: str = "UNet2DModel") -> str:
    """``block_type`` without a ``UNetRes`` prefix, or ValueError if fusediff's ``model`` lacks it."""
    if not isinstance(block_type, str):
        raise ValueError(f"{kind} block type must be a string; got {block_type!r}")
    name = block_type[len("UNetRes"):] if block_type.startswith("UNetRes") else block_type
    if name not in supported:
        raise ValueError(f"{kind} block type {block_type!r} is not supported by fusediff's {model} "
                         f"(supported: {', '.join(supported)})")
    return name


def _resample_type(value: str | None, what: str) -> str:
    """``"conv"`` for None (diffusers' fallback), else ``value`` if it is ``"conv"`` or ``"resnet"``."""
    if value is None:
        return "conv"
    if value not in RESAMPLE_TYPES:
        raise ValueError(f"{what} must be one of {', '.join(RESAMPLE_TYPES)}; got {value!r}")
    return value


def get_down_block(down_block_type: str, *, num_layers: int, in_channels: int, out_channels: int,
                   temb_channels: int, add_downsample: bool, resnet_eps: float, resnet_act_fn: str,
                   resnet_groups: int = 32, attention_head_dim: int | None = None, downsample_padding: int = 1,
                   resnet_time_scale_shift: str = "default", downsample_type: str | None = "conv",
                   dropout: float = 0.0) -> nn.Module:
    """Build the down block named ``down_block_type`` (see :data:`DOWN_BLOCK_TYPES`)."""
    name = _block_name(down_block_type, DOWN_BLOCK_TYPES, "down")
    downsample_type = _resample_type(downsample_type, "downsample_type")
    common = dict(num_layers=num_layers, in_channels=in_channels, out_channels=out_channels,
                  temb_channels=temb_channels, dropout=dropout, resnet_eps=resnet_eps, resnet_act_fn=resnet_act_fn,
                  resnet_groups=resnet_groups, resnet_time_scale_shift=resnet_time_scale_shift)
    if name == "DownBlock2D":  # always a conv downsampler, whatever downsample_type says (as in diffusers)
        return DownBlock2D(add_downsample=add_downsample, downsample_padding=downsample_padding, **common)
    if name == "AttnDownBlock2D":
        return AttnDownBlock2D(attention_head_dim=attention_head_dim, downsample_padding=downsample_padding,
                               downsample_type=downsample_type if add_downsample else None, **common)
    return ResnetDownsampleBlock2D(add_downsample=add_downsample, **common)


def get_up_block(up_block_type: str, *, num_layers: int, in_channels: int, out_channels: int,
                 prev_output_channel: int, temb_channels: int, add_upsample: bool, resnet_eps: float,
                 resnet_act_fn: str, resnet_groups: int = 32, attention_head_dim: int | None = None,
                 resnet_time_scale_shift: str = "default", upsample_type: str | None = "conv",
                 dropout: float = 0.0) -> nn.Module:
    """Build the up block named ``up_block_type`` (see :data:`UP_BLOCK_TYPES`)."""
    name = _block_name(up_block_type, UP_BLOCK_TYPES, "up")
    upsample_type = _resample_type(upsample_type, "upsample_type")
    common = dict(num_layers=num_layers, in_channels=in_channels, out_channels=out_channels,
                  prev_output_channel=prev_output_channel, temb_channels=temb_channels, dropout=dropout,
                  resnet_eps=resnet_eps, resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups,
                  resnet_time_scale_shift=resnet_time_scale_shift)
    if name == "UpBlock2D":  # always a conv upsampler, whatever upsample_type says (as in diffusers)
        return UpBlock2D(add_upsample=add_upsample, **common)
    if name == "AttnUpBlock2D":
        return AttnUpBlock2D(attention_head_dim=attention_head_dim,
                             upsample_type=upsample_type if add_upsample else None, **common)
    return ResnetUpsampleBlock2D(add_upsample=add_upsample, **common)
