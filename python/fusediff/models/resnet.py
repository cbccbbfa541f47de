"""Residual blocks and 2x resampling layers of the DDPM-family UNet.

:class:`ResnetBlock2D` is the residual block of DDPM (Ho et al. 2020, Appendix B, after the
Wide ResNet of Zagoruyko & Komodakis 2016): GroupNorm, SiLU, 3x3 conv, add the projected time
embedding, GroupNorm, SiLU, dropout, 3x3 conv, plus a (1x1-projected) shortcut. With
``time_embedding_norm="scale_shift"`` the embedding modulates the second norm as
h * (1 + scale) + shift instead (the adaptive group norm of Dhariwal & Nichol 2021,
arXiv:2105.05233, Sec. 3, "AdaGN"). ``up``/``down`` resample inside the block (BigGAN-style
residual resampling, used by ADM and by ``downsample_type="resnet"``).

Where a GroupNorm is followed by SiLU the two run as one fused op
(:class:`~fusediff.models.normalization.GroupNorm` with ``activation="silu"``); with
scale-shift the modulation sits between them, so the second norm runs without it.
Parameter names match diffusers' (``norm1``, ``conv1``, ``time_emb_proj``, ``norm2``,
``conv2``, ``conv_shortcut``; ``conv`` in the resamplers). On CUDA a channels-last map is upsampled
2x by :func:`upsample_nearest_2x_channels_last`, one broadcast copy in NHWC order, not PyTorch's
NHWC nearest kernel, which is about 2.8x slower than its NCHW one on the SD VAE decoder's sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .activations import dropout, get_activation, is_silu
from .layout import memory_format_of
from .normalization import GroupNorm
from .time_projections import TimeProjections

TIME_EMBEDDING_NORMS = ("default", "scale_shift")
# PyTorch's channels-last nearest-neighbour upsampling on CUDA wrote zeros into outputs of 2^31
# elements or more (pytorch/pytorch#141831; fixed by #141923 for torch 2.7), and on ROCm its launch
# fails at that size (#180310). Upsample2D feeds such outputs a contiguous input instead: one layout
# copy, at that size and on those versions only (diffusers copies for any batch of 64 or more).
# Only F.interpolate needs this: an exact 2x of a channels-last map never reaches that kernel
# (upsample_nearest_2x_channels_last is a plain copy, which splits large tensors for 32-bit indexing).
NHWC_NEAREST_SAFE = torch.__version__ >= (2, 7) and torch.version.hip is None
NHWC_NEAREST_MAX_NUMEL = 2**31
# Device types where upsample_nearest_2x_channels_last beats F.interpolate on a channels-last map: on
# CUDA the NHWC nearest kernel is slow; on the CPU its loop over C is as fast as the copy or faster.
NEAREST_2X_COPY_DEVICES = ("cuda",)


class Downsample2D(nn.Module):
    """Halve H and W: a stride-2 3x3 conv (``use_conv``) or 2x2 average pooling.

    With ``padding=0`` the input is padded by one row and column at the bottom/right, so the
    conv still halves even sizes exactly (the asymmetric padding of the original TF code).
    """

    def __init__(self, channels: int, use_conv: bool = False, out_channels: int | None = None,
                 padding: int = 1) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.padding = padding
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, kernel_size=3, stride=2, padding=padding)
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample2D: average pooling cannot change the channel count "
                                 f"({channels} -> {self.out_channels})")
            self.conv = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C_out, H/2, W/2)
        if self.use_conv and self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


def upsample_nearest_2x_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=2, mode="nearest")`` of a channels-last map, exactly (a pure copy).

    Output row 2i + a, column 2j + b is input (i, j): in NHWC memory order that is a broadcast of
    x over two new size-2 dims, written by one elementwise copy whose reads and writes both run
    along C, coalesced (not torch's vectorised contiguous-copy path: the broadcast input has
    stride-0 dims). PyTorch's NHWC nearest kernel (``upsample_nearest2d_nhwc_out_frame``) took
    0.69 ms for the SD VAE decoder's three upsamplings on an H100 (fp16), against 0.25 ms for its
    NCHW kernel on the same sizes.
    """
    batch, channels, height, width = x.shape
    nhwc = x.permute(0, 2, 3, 1)  # (B, H, W, C), a view of channels-last memory
    out = nhwc[:, :, None, :, None, :].expand(batch, height, 2, width, 2, channels)  # (B, H, 2, W, 2, C), a view
    # the one copy; contiguous() rather than reshape, which would return a stride-0 view when H = W = 1
    out = out.contiguous().view(batch, 2 * height, 2 * width, channels)  # (B, 2H, 2W, C)
    return out.permute(0, 3, 1, 2)  # (B, C, 2H, 2W), a channels-last view


class Upsample2D(nn.Module):
    """Double H and W by nearest-neighbour interpolation, then an optional 3x3 conv.

    A channels-last CUDA input doubled exactly (no ``output_size``, or one equal to 2x) takes
    :func:`upsample_nearest_2x_channels_last`; other inputs, devices and sizes take ``F.interpolate``
    (see ``NEAREST_2X_COPY_DEVICES``).
    """

    def __init__(self, channels: int, use_conv: bool = False, out_channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.conv = nn.Conv2d(channels, self.out_channels, kernel_size=3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        # (B, C, H, W) -> (B, C_out, 2H, 2W), or output_size when given; in x's layout
        exact_2x = output_size is None or tuple(output_size) == (2 * x.shape[2], 2 * x.shape[3])
        if exact_2x and x.device.type in NEAREST_2X_COPY_DEVICES and memory_format_of(x) == torch.channels_last:
            x = upsample_nearest_2x_channels_last(x)  # a copy, not the NHWC nearest kernel: no size guard
        else:
            if x.is_cuda and not NHWC_NEAREST_SAFE:
                out_hw = 4 * x.shape[2] * x.shape[3] if output_size is None else output_size[0] * output_size[1]
                if x.shape[0] * x.shape[1] * out_hw >= NHWC_NEAREST_MAX_NUMEL:
                    x = x.contiguous()  # see NHWC_NEAREST_SAFE
            if output_size is None:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            else:
                x = F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class ResnetBlock2D(nn.Module):
    """Residual block conditioned on a time embedding: x + f(x, temb), divided by ``output_scale_factor``.

    Args:
        in_channels: C_in of the input.
        out_channels: C_out of the output; ``in_channels`` when None. A 1x1 conv projects the
            shortcut when the two differ (or when ``use_in_shortcut``).
        temb_channels: width of the time embedding, or None for a block without one.
        dropout: dropout probability before the second conv.
        groups: GroupNorm groups of the first norm; ``groups_out`` of the second (default ``groups``).
        eps: GroupNorm epsilon.
        non_linearity: activation name (see :mod:`fusediff.models.activations`).
        time_embedding_norm: ``"default"`` (add the embedding before the second norm) or
            ``"scale_shift"`` (modulate after it).
        skip_time_act: project the embedding without applying the activation first.
        output_scale_factor: divides the sum of shortcut and residual.
        use_in_shortcut: force (or forbid) the 1x1 shortcut conv.
        up, down: resample by 2 (nearest / average pooling) after the first norm.
    """

    def __init__(self, *, in_channels: int, out_channels: int | None = None, temb_channels: int | None = 512,
                 dropout: float = 0.0, groups: int = 32, groups_out: int | None = None, eps: float = 1e-6,
                 non_linearity: str = "swish", time_embedding_norm: str = "default", skip_time_act: bool = False,
                 output_scale_factor: float = 1.0, use_in_shortcut: bool | None = None, up: bool = False,
                 down: bool = False) -> None:
        super().__init__()
        if time_embedding_norm not in TIME_EMBEDDING_NORMS:
            raise ValueError(f"ResnetBlock2D: time_embedding_norm must be one of {TIME_EMBEDDING_NORMS}; "
                             f"got {time_embedding_norm!r}")
        if up and down:
            raise ValueError("ResnetBlock2D: up and down cannot both be set")
        out_channels = in_channels if out_channels is None else out_channels
        groups_out = groups if groups_out is None else groups_out
        self.in_channels, self.out_channels = in_channels, out_channels
        self.time_embedding_norm = time_embedding_norm
        self.skip_time_act = skip_time_act
        self.output_scale_factor = output_scale_factor
        self.up, self.down = up, down
        # SiLU fuses into the norm that precedes it; other activations run after the norm.
        self.fused_act = is_silu(non_linearity)
        act = "silu" if self.fused_act else None
        self.nonlinearity = get_activation(non_linearity)

        self.norm1 = GroupNorm(groups, in_channels, eps=eps, activation=act)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels is None:
            self.time_emb_proj = None
        else:
            proj_out = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels
            self.time_emb_proj = nn.Linear(temb_channels, proj_out)
        # With scale-shift the modulation comes between norm2 and the activation.
        self.norm2 = GroupNorm(groups_out, out_channels, eps=eps,
                               activation=act if time_embedding_norm == "default" else None)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)

        self.upsample = Upsample2D(in_channels) if up else None
        self.downsample = Downsample2D(in_channels, padding=1) if down else None
        if use_in_shortcut is None:
            use_in_shortcut = in_channels != out_channels
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if use_in_shortcut else None

    def _norm_act(self, norm: GroupNorm, h: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """norm (of h + add[:, :, None, None] when add is given) followed by the block's activation; one
        fused op when the activation is SiLU."""
        if add is not None and add.dtype != h.dtype:  # the sum promotes: add it as torch does
            h, add = h + add[:, :, None, None], None
        h = norm(h, add=add)
        return h if norm.activation is not None else self.nonlinearity(h)

    def _project_time(self, temb: torch.Tensor | TimeProjections) -> torch.Tensor:
        """time_emb_proj(act(temb)); from the model's stacked matmul when it made one (time_projections.py)."""
        if isinstance(temb, TimeProjections):
            projected = temb.of(self)
            if projected is not None:
                return projected
            temb = temb.temb
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        return self.time_emb_proj(temb)

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | TimeProjections | None) -> torch.Tensor:
        # input_tensor (B, C_in, H, W), temb (B, temb_channels) -> (B, C_out, H', W')
        x = input_tensor
        h = self._norm_act(self.norm1, x)  # (B, C_in, H, W)
        if self.upsample is not None:
            x, h = self.upsample(x), self.upsample(h)  # (B, C_in, 2H, 2W)
        elif self.downsample is not None:
            x, h = self.downsample(x), self.downsample(h)  # (B, C_in, H/2, W/2)
        h = self.conv1(h)  # (B, C_out, H', W')

        if self.time_emb_proj is not None and temb is not None:
            temb = self._project_time(temb)  # (B, C_out or 2 C_out)
        else:
            temb = None

        if self.time_embedding_norm == "default":
            h = self._norm_act(self.norm2, h, add=temb)  # norm2(h + temb[:, :, None, None]), the add fused
        else:
            if temb is None:
                raise ValueError("ResnetBlock2D: time_embedding_norm='scale_shift' needs a time embedding")
            scale, shift = torch.chunk(temb[:, :, None, None], 2, dim=1)  # (B, C_out, 1, 1) each
            h = self.norm2(h) * (1 + scale) + shift
            h = self.nonlinearity(h)

        h = self.conv2(dropout(self.dropout, h))  # (B, C_out, H', W')
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor
