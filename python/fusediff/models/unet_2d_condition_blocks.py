"""The cross-attention blocks of the text-conditioned UNet, the factories that build its blocks, its config check.

A cross-attention block is a DDPM-family block (:mod:`fusediff.models.unet_2d_blocks`) whose
attention after each residual block is a :class:`~fusediff.models.transformer_2d.Transformer2DModel`:
the feature map attends to itself and to the encoder's hidden states (B, L, cross_attention_dim).
This is how latent diffusion conditions its UNet on text (Rombach et al. 2022, arXiv:2112.10752,
Sec. 3.3 and Fig. 3). The down block keeps each output for the skip connections and halves the
resolution with a stride-2 conv; the up block concatenates the skips and doubles it (to
``upsample_size`` when the UNet forwards one for odd sizes); the mid block is resnet, transformer,
resnet. The transformer's head count is ``num_attention_heads`` and its head width
``channels // num_attention_heads``, as in diffusers.

Supported block types (diffusers' names; a ``UNetRes`` prefix is accepted and ignored):
``CrossAttnDownBlock2D``, ``DownBlock2D``, ``ResnetDownsampleBlock2D``, ``SimpleCrossAttnDownBlock2D``;
``CrossAttnUpBlock2D``, ``UpBlock2D``, ``ResnetUpsampleBlock2D``, ``SimpleCrossAttnUpBlock2D``;
``UNetMidBlock2DCrossAttn``, ``UNetMidBlock2DSimpleCrossAttn``, ``UNetMidBlock2D`` (one resnet, as
diffusers builds it here) or None. The Resnet* and SimpleCrossAttn* blocks (DeepFloyd IF's) live in
:mod:`fusediff.models.unet_2d_blocks` and :mod:`fusediff.models.unet_2d_simple_blocks`; as in
diffusers, only they take ``resnet_skip_time_act`` and ``resnet_out_scale_factor`` (the mid block
only the former), and only the SimpleCrossAttn* blocks ``cross_attention_norm``. Others (K*, dual
cross-attention, GLIGEN) raise ValueError. Module and parameter names match diffusers'.
:func:`check_config` validates a UNet2DConditionModel config before anything is built (DESIGN.md,
decision 3): every key it cannot honour is named.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .activations import check_activation
from .resnet import TIME_EMBEDDING_NORMS
from .transformer_2d import Transformer2DModel
from .unet_2d_blocks import DownBlock2D, MakeAttention, ResnetDownsampleBlock2D, ResnetUpsampleBlock2D, \
    UNetMidBlock2D, UpBlock2D, _block_name, _DownBlock, _MidBlock, _UpBlock
from .unet_2d_checks import is_int, one_of, positive_int, check_levels
from .unet_2d_simple_blocks import SimpleCrossAttnDownBlock2D, SimpleCrossAttnUpBlock2D, UNetMidBlock2DSimpleCrossAttn

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D", "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D", "ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2DSimpleCrossAttn", "UNetMidBlock2D")
MODEL = "UNet2DConditionModel"
# config keys fusediff does not implement, with the value each must keep
UNSUPPORTED = {"num_attention_heads": None, "dual_cross_attention": False, "timestep_post_act": None,
               "attention_type": "default"}
# values diffusers accepts that fusediff does not implement (NotImplementedError), per key
UNSUPPORTED_VALUES = {"encoder_hid_dim_type": ("text_image_proj", "image_proj", "ip_image_proj"),
                      "addition_embed_type": ("text_image", "text_time", "image", "image_hint"),
                      "class_embed_type": ("projection", "simple_projection"),
                      "cross_attention_norm": ("layer_norm",)}


def _per_layer(value: int | Sequence[int], num_layers: int) -> list[int]:
    """Transformer depth for each of ``num_layers`` layers: an int for all, or one int per layer."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return [int(value)] * num_layers
    if isinstance(value, Sequence) and len(value) == num_layers:
        return [int(v) for v in value]
    raise ValueError(f"transformer_layers_per_block must be an int or a list of {num_layers} ints (one per layer); "
                     f"got {value!r}")


def _transformers(num_attention_heads: int, cross_attention_dim: int | None, norm_groups: int,
                  transformer_layers_per_block: int | Sequence[int], num_layers: int, *,
                  use_linear_projection: bool, only_cross_attention: bool, upcast_attention: bool) -> MakeAttention:
    """The factory of a block's Transformer2DModels: ``num_attention_heads`` heads of ``channels // heads``."""
    depths = _per_layer(transformer_layers_per_block, num_layers)

    def make(channels: int, index: int) -> Transformer2DModel:
        if not 1 <= num_attention_heads <= channels:
            raise ValueError(f"{num_attention_heads} attention heads cannot split {channels} channels (each head "
                             "is channels // heads wide; note that diffusers' attention_head_dim is the head count)")
        return Transformer2DModel(num_attention_heads, channels // num_attention_heads, in_channels=channels,
                                  num_layers=depths[index], cross_attention_dim=cross_attention_dim,
                                  norm_num_groups=norm_groups, use_linear_projection=use_linear_projection,
                                  only_cross_attention=only_cross_attention, upcast_attention=upcast_attention)

    return make


class _TransformerAttention:
    """Mixin: the block's attentions are Transformer2DModels, run on the block's conditioning inputs."""

    has_cross_attention = True

    def _attend(self, index: int, hidden_states: torch.Tensor, inputs: dict) -> torch.Tensor:
        return self.attentions[index](hidden_states, return_dict=False, **inputs)[0]


def _opts(dropout, resnet_eps, resnet_time_scale_shift, resnet_act_fn, resnet_groups, output_scale_factor) -> dict:
    """The block-wide resnet options of :mod:`fusediff.models.unet_2d_blocks`."""
    return dict(dropout=dropout, resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups, output_scale_factor=output_scale_factor,
                skip_time_act=False)


class CrossAttnDownBlock2D(_TransformerAttention, _DownBlock):
    """Residual blocks each followed by a Transformer2DModel, then a stride-2 conv (when ``add_downsample``).

    ``forward(hidden_states, temb, encoder_hidden_states=...)`` returns the output (B, C_out, H', W')
    and the outputs kept for the skip connections.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 1, transformer_layers_per_block: int | Sequence[int] = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int = 32, num_attention_heads: int = 1, cross_attention_dim: int = 1280,
                 output_scale_factor: float = 1.0, downsample_padding: int = 1, add_downsample: bool = True,
                 use_linear_projection: bool = False, only_cross_attention: bool = False,
                 upcast_attention: bool = False) -> None:
        make = _transformers(num_attention_heads, cross_attention_dim, resnet_groups, transformer_layers_per_block,
                             num_layers, use_linear_projection=use_linear_projection,
                             only_cross_attention=only_cross_attention, upcast_attention=upcast_attention)
        super().__init__(in_channels, out_channels, temb_channels, num_layers, attention=True,
                         attention_head_dim=None, downsample="conv" if add_downsample else None,
                         downsample_padding=downsample_padding, make_attention=make,
                         **_opts(dropout, resnet_eps, resnet_time_scale_shift, resnet_act_fn, resnet_groups,
                                 output_scale_factor))


class CrossAttnUpBlock2D(_TransformerAttention, _UpBlock):
    """Residual blocks over the concatenated skips, each followed by a Transformer2DModel, then nearest 2x + conv.

    ``forward(hidden_states, res_hidden_states_tuple, temb, upsample_size, encoder_hidden_states=...)``.
    """

    def __init__(self, in_channels: int, out_channels: int, prev_output_channel: int, temb_channels: int,
                 dropout: float = 0.0, num_layers: int = 1, transformer_layers_per_block: int | Sequence[int] = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int = 32, num_attention_heads: int = 1, cross_attention_dim: int = 1280,
                 output_scale_factor: float = 1.0, add_upsample: bool = True, use_linear_projection: bool = False,
                 only_cross_attention: bool = False, upcast_attention: bool = False) -> None:
        make = _transformers(num_attention_heads, cross_attention_dim, resnet_groups, transformer_layers_per_block,
                             num_layers, use_linear_projection=use_linear_projection,
                             only_cross_attention=only_cross_attention, upcast_attention=upcast_attention)
        super().__init__(in_channels, prev_output_channel, out_channels, temb_channels, num_layers, attention=True,
                         attention_head_dim=None, upsample="conv" if add_upsample else None, make_attention=make,
                         **_opts(dropout, resnet_eps, resnet_time_scale_shift, resnet_act_fn, resnet_groups,
                                 output_scale_factor))


class UNetMidBlock2DCrossAttn(_TransformerAttention, _MidBlock):
    """Resnet, then ``num_layers`` x (Transformer2DModel, resnet), at constant resolution and width.

    Its transformers never use ``only_cross_attention`` (as in diffusers, whose UNet does not pass
    ``mid_block_only_cross_attention`` to this block).
    """

    def __init__(self, in_channels: int, temb_channels: int, dropout: float = 0.0, num_layers: int = 1,
                 transformer_layers_per_block: int | Sequence[int] = 1, resnet_eps: float = 1e-6,
                 resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int | None = 32, num_attention_heads: int = 1, output_scale_factor: float = 1.0,
                 cross_attention_dim: int = 1280, use_linear_projection: bool = False,
                 upcast_attention: bool = False) -> None:
        resnet_groups = resnet_groups if resnet_groups is not None else min(in_channels // 4, 32)
        make = _transformers(num_attention_heads, cross_attention_dim, resnet_groups, transformer_layers_per_block,
                             num_layers, use_linear_projection=use_linear_projection, only_cross_attention=False,
                             upcast_attention=upcast_attention)
        super().__init__(in_channels, temb_channels, num_layers, make,
                         _opts(dropout, resnet_eps, resnet_time_scale_shift, resnet_act_fn, resnet_groups,
                               output_scale_factor))


TRANSFORMER_ARGS = ("transformer_layers_per_block", "num_attention_heads", "cross_attention_dim",
                    "use_linear_projection", "only_cross_attention", "upcast_attention")


def _resnet_args(kwargs: dict) -> dict:
    """``kwargs`` less the transformer arguments, for the blocks without attention."""
    return {k: v for k, v in kwargs.items() if k not in TRANSFORMER_ARGS}


def _simple_args(kwargs: dict, attention_head_dim: int | None, cross_attention_norm: str | None) -> dict:
    """The resnet arguments plus those of the added-KV attention, for the SimpleCrossAttn* blocks."""
    head_dim = attention_head_dim if attention_head_dim is not None else kwargs["out_channels"]  # diffusers' rule
    return dict(_resnet_args(kwargs), attention_head_dim=head_dim, cross_attention_norm=cross_attention_norm,
                cross_attention_dim=kwargs.get("cross_attention_dim", 1280),
                only_cross_attention=kwargs.get("only_cross_attention", False))


def get_down_block(down_block_type: str, *, add_downsample: bool, downsample_padding: int = 1,
                   resnet_skip_time_act: bool = False, resnet_out_scale_factor: float = 1.0,
                   cross_attention_norm: str | None = None, attention_head_dim: int | None = None,
                   **kwargs) -> nn.Module:
    """Build the down block named ``down_block_type`` (see :data:`DOWN_BLOCK_TYPES`).

    ``kwargs``: the block's resnet arguments (``num_layers``, ``in_channels``, ``out_channels``,
    ``temb_channels``, ``resnet_eps``, ``resnet_act_fn``, ``resnet_groups``,
    ``resnet_time_scale_shift``, ``dropout``) and the :data:`TRANSFORMER_ARGS`, which only the
    cross-attention block takes (the simple one takes ``cross_attention_dim`` and
    ``only_cross_attention``). ``attention_head_dim`` is the simple block's head WIDTH
    (``out_channels`` when None); ``resnet_skip_time_act`` and ``resnet_out_scale_factor`` reach
    only the Resnet* and SimpleCrossAttn* blocks, ``cross_attention_norm`` only the latter.
    """
    name = _block_name(down_block_type, DOWN_BLOCK_TYPES, "down", MODEL)
    adm = dict(add_downsample=add_downsample, skip_time_act=resnet_skip_time_act,
               output_scale_factor=resnet_out_scale_factor)
    if name == "DownBlock2D":
        return DownBlock2D(add_downsample=add_downsample, downsample_padding=downsample_padding,
                           **_resnet_args(kwargs))
    if name == "ResnetDownsampleBlock2D":
        return ResnetDownsampleBlock2D(**adm, **_resnet_args(kwargs))
    if name == "SimpleCrossAttnDownBlock2D":
        return SimpleCrossAttnDownBlock2D(**adm, **_simple_args(kwargs, attention_head_dim, cross_attention_norm))
    return CrossAttnDownBlock2D(add_downsample=add_downsample, downsample_padding=downsample_padding, **kwargs)


def get_up_block(up_block_type: str, *, add_upsample: bool, resnet_skip_time_act: bool = False,
                 resnet_out_scale_factor: float = 1.0, cross_attention_norm: str | None = None,
                 attention_head_dim: int | None = None, **kwargs) -> nn.Module:
    """Build the up block named ``up_block_type`` (see :data:`UP_BLOCK_TYPES`); arguments as for get_down_block,
    plus ``prev_output_channel``."""
    name = _block_name(up_block_type, UP_BLOCK_TYPES, "up", MODEL)
    adm = dict(add_upsample=add_upsample, skip_time_act=resnet_skip_time_act,
               output_scale_factor=resnet_out_scale_factor)
    if name == "UpBlock2D":
        return UpBlock2D(add_upsample=add_upsample, **_resnet_args(kwargs))
    if name == "ResnetUpsampleBlock2D":
        return ResnetUpsampleBlock2D(**adm, **_resnet_args(kwargs))
    if name == "SimpleCrossAttnUpBlock2D":
        return SimpleCrossAttnUpBlock2D(**adm, **_simple_args(kwargs, attention_head_dim, cross_attention_norm))
    return CrossAttnUpBlock2D(add_upsample=add_upsample, **kwargs)


def get_mid_block(mid_block_type: str | None, *, resnet_skip_time_act: bool = False,
                  cross_attention_norm: str | None = None, attention_head_dim: int = 1,
                  only_cross_attention: bool = False, **kwargs) -> nn.Module | None:
    """Build the mid block named ``mid_block_type`` (see :data:`MID_BLOCK_TYPES`), or None for None.

    ``kwargs``: ``in_channels``, ``temb_channels``, the resnet arguments, ``output_scale_factor``
    and the :data:`TRANSFORMER_ARGS` except ``only_cross_attention``, which (with
    ``resnet_skip_time_act``, ``cross_attention_norm`` and the head width ``attention_head_dim``)
    only the simple cross-attention mid block takes: its value is the UNet's
    ``mid_block_only_cross_attention``.
    """
    if mid_block_type is None:
        return None
    if mid_block_type not in MID_BLOCK_TYPES:
        raise ValueError(f"mid_block_type {mid_block_type!r} is not supported by fusediff's {MODEL} "
                         f"(supported: {', '.join(MID_BLOCK_TYPES)} or None)")
    if mid_block_type == "UNetMidBlock2D":  # diffusers' conditional UNet builds it as a single resnet
        return UNetMidBlock2D(num_layers=0, add_attention=False, **_resnet_args(kwargs))
    if mid_block_type == "UNetMidBlock2DSimpleCrossAttn":
        return UNetMidBlock2DSimpleCrossAttn(
            skip_time_act=resnet_skip_time_act, cross_attention_norm=cross_attention_norm,
            attention_head_dim=attention_head_dim, only_cross_attention=only_cross_attention,
            cross_attention_dim=kwargs.get("cross_attention_dim", 1280),
            **_resnet_args(kwargs))
    return UNetMidBlock2DCrossAttn(**kwargs)


def per_block(config: Mapping[str, Any], key: str, n: int, ok: Callable[[Any], bool] = lambda v: True,
              what: str = "") -> list:
    """``config[key]`` as one value per block: a single value repeated, or a list of ``n`` values."""
    value = config[key]
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n or not all(ok(v) for v in values):
        raise ValueError(f"{key} must be {what} or a list of {n} of them (one per block); got {value!r}")
    return values


def _depth(value: Any) -> bool:
    """Whether ``value`` is a transformer depth: an int >= 0, or a list of them (one per layer)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return all(is_int(v) and v >= 0 for v in values)


def check_config(config: Mapping[str, Any]) -> None:
    """Raise NotImplementedError/ValueError naming the first key of ``config`` that fusediff cannot build."""
    for key, neutral in UNSUPPORTED.items():
        if config[key] != neutral:
            raise NotImplementedError(f"{MODEL}: {key}={config[key]!r} is not supported by fusediff "
                                      f"(it must be {neutral!r})")
    for key, values in UNSUPPORTED_VALUES.items():
        if config[key] in values:
            raise NotImplementedError(f"{MODEL}: {key}={config[key]!r} is not supported by fusediff")
    one_of(config, "class_embed_type", (None, "timestep", "identity"))
    one_of(config, "encoder_hid_dim_type", (None, "text_proj"))
    one_of(config, "addition_embed_type", (None, "text"))
    one_of(config, "cross_attention_norm", (None, "group_norm"))
    one_of(config, "time_embedding_type", ("positional", "fourier"))
    one_of(config, "resnet_time_scale_shift", TIME_EMBEDDING_NORMS)
    one_of(config, "mid_block_type", (None, *MID_BLOCK_TYPES))
    for key in ("in_channels", "out_channels", "norm_num_groups"):
        positive_int(config, key)
    for key in ("time_embedding_dim", "time_cond_proj_dim", "num_class_embeds", "encoder_hid_dim"):
        positive_int(config, key, optional=True)
    positive_int(config, "addition_embed_type_num_heads")
    for key in ("resnet_skip_time_act", "class_embeddings_concat"):
        if not isinstance(config[key], bool):
            raise ValueError(f"{key} must be a bool; got {config[key]!r}")
    if not (config["mid_block_only_cross_attention"] is None or isinstance(config["mid_block_only_cross_attention"],
                                                                         bool)):
        raise ValueError(f"mid_block_only_cross_attention must be a bool or None; got "
                         f"{config['mid_block_only_cross_attention']!r}")
    for key in ("resnet_out_scale_factor", "mid_block_scale_factor"):
        if isinstance(config[key], bool) or not isinstance(config[key], numbers.Real) or not config[key] > 0:
            raise ValueError(f"{key} must be a number > 0 (it divides the resnets' outputs); got {config[key]!r}")
    _check_conditioning(config)
    channels = check_levels(config, DOWN_BLOCK_TYPES, UP_BLOCK_TYPES, MODEL)
    n = len(channels)
    for key in ("layers_per_block", "attention_head_dim", "cross_attention_dim"):
        per_block(config, key, n, lambda v: is_int(v) and v > 0, "a positive int")
    per_block(config, "only_cross_attention", n, lambda v: isinstance(v, bool), "a bool")
    depths = per_block(config, "transformer_layers_per_block", n, _depth, "an int >= 0 (or a list per layer)")
    if config["reverse_transformer_layers_per_block"] is not None:
        per_block(config, "reverse_transformer_layers_per_block", n, _depth, "an int >= 0 (or a list per layer)")
    elif any(isinstance(d, (list, tuple)) for d in depths):
        raise ValueError("transformer_layers_per_block with a list per block needs "
                         "reverse_transformer_layers_per_block")
    for key in ("conv_in_kernel", "conv_out_kernel"):
        if not is_int(config[key]) or config[key] < 1 or config[key] % 2 == 0:
            raise ValueError(f"{key} must be a positive odd int (the convs keep the size); got {config[key]!r}")
    check_activation(config["act_fn"])
    if config["time_embedding_act_fn"] is not None:
        check_activation(config["time_embedding_act_fn"], "time_embedding_act_fn")
    if not isinstance(config["downsample_padding"], numbers.Integral) or config["downsample_padding"] < 0:
        raise ValueError(f"downsample_padding must be an int >= 0; got {config['downsample_padding']!r}")
    if not isinstance(config["dropout"], numbers.Real) or not 0.0 <= config["dropout"] <= 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1]; got {config['dropout']!r}")
    if not isinstance(config["norm_eps"], numbers.Real) or not config["norm_eps"] >= 0:
        raise ValueError(f"norm_eps must be a float >= 0; got {config['norm_eps']!r}")


def _check_conditioning(config: Mapping[str, Any]) -> None:
    """The text projection, the pooled text embedding and the class-embedding concatenation fit together."""
    hid_dim, cross = config["encoder_hid_dim"], config["cross_attention_dim"]
    if config["encoder_hid_dim_type"] is not None and hid_dim is None:
        raise ValueError(f"encoder_hid_dim_type={config['encoder_hid_dim_type']!r} needs encoder_hid_dim")
    if hid_dim is not None and not is_int(cross):
        raise ValueError("encoder_hid_dim projects the context to cross_attention_dim, which must then be one int; "
                         f"got {cross!r}")
    if config["addition_embed_type"] == "text":
        width = hid_dim if hid_dim is not None else cross  # the width of the tokens it pools
        heads = config["addition_embed_type_num_heads"]
        if not is_int(width):
            raise ValueError("addition_embed_type='text' pools tokens of width cross_attention_dim (no "
                             f"encoder_hid_dim), which must then be one int; got {width!r}")
        if width % heads:
            raise ValueError(f"addition_embed_type_num_heads={heads} must divide the width {width} of the text "
                             "tokens it pools (encoder_hid_dim, else cross_attention_dim)")
    if config["class_embeddings_concat"]:
        if config["class_embed_type"] is None and config["num_class_embeds"] is None:
            raise ValueError("class_embeddings_concat=True needs a class embedding (class_embed_type or "
                             "num_class_embeds): the blocks take a time embedding twice as wide")
        if config["addition_embed_type"] is not None:
            raise ValueError("class_embeddings_concat=True doubles the time embedding, which "
                             f"addition_embed_type={config['addition_embed_type']!r} cannot be added to")
