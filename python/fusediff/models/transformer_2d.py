"""Transformer2DModel: the spatial transformer that conditions latent diffusion's UNet on text.

    h = GroupNorm(x)                                   (B, C, H, W), eps 1e-6
    h = proj_in(h) as a sequence                       (B, S, inner), S = H*W, inner = heads * D
    for each BasicTransformerBlock:
        h = h + attn1(LayerNorm(h))                    self-attention (cross- with only_cross_attention)
        h = h + attn2(LayerNorm(h), context)           cross-attention on (B, L, cross_attention_dim)
        h = h + FF(LayerNorm(h))                       GEGLU feed-forward
    out = proj_out(h) as a map + x                     (B, C, H, W)

The "SpatialTransformer" of latent diffusion (Rombach et al. 2022, arXiv:2112.10752, Sec. 3.3:
the UNet's intermediate maps attend to a domain-specific encoding of the condition, tau(y)),
built from pre-norm Transformer blocks (Vaswani et al. 2017, arXiv:1706.03762). ``proj_in`` and
``proj_out`` are 1x1 convs (SD 1.x, LDM) or Linear layers (``use_linear_projection``, SD 2.x).
Both attentions run :func:`fusediff.kernels.attention` and the GroupNorm
:func:`fusediff.kernels.group_norm`. The LayerNorms run :func:`fusediff.kernels.layer_norm`, the
second and third in its residual form: one op adds the attention's output to h and normalises the
sum (h_new, LayerNorm(h_new)), as the block's torch ops do, reading the sum once; on the reference
path (CPU) that is torch's add and layer_norm, the same bits as diffusers' block. The feed-forward's
GEGLU is :func:`fusediff.kernels.geglu`.

The constructor takes diffusers 0.42.1's ``Transformer2DModel`` arguments with the same defaults
and the module tree has its parameter names. Only continuous input with ``norm_type="layer_norm"``
is supported: discrete (``num_vector_embeds``) and patched (``patch_size``) input, the AdaLayerNorm
variants, gated (GLIGEN) attention and caption projections raise NotImplementedError, as do
attention masks of the model's call (a :class:`BasicTransformerBlock` takes an additive mask for its
self-attention, as unCLIP's prior uses it). Gradient checkpointing and feed-forward chunking are not implemented.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..configuration import register_to_config
from ..modeling import ModelMixin
from ..utils.outputs import BaseOutput
from .attention import Attention
from .feed_forward import FeedForward
from .layout import memory_format_of
from .normalization import GroupNorm, layer_norm


def refuse_unsupported(owner: str, **inputs: Any) -> None:
    """NotImplementedError naming the first of ``inputs`` that is set (neither None nor an empty dict)."""
    for name, value in inputs.items():
        if value is not None and not (isinstance(value, dict) and not value):
            what = f"keys {sorted(value)}" if isinstance(value, dict) else f"a {type(value).__name__}"
            raise NotImplementedError(f"{owner}: {name} is not supported by fusediff (got {what}); pass None")


@dataclasses.dataclass
class Transformer2DModelOutput(BaseOutput):
    """Output of :class:`Transformer2DModel`: ``sample`` of shape (B, C, H, W)."""

    sample: torch.Tensor


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block over (B, S, dim): self-attention, cross-attention, feed-forward, each residual.

    Args:
        dim: width of the sequence.
        num_attention_heads, attention_head_dim: heads and the width D of each.
        dropout: dropout in the attentions' outputs and the feed-forward.
        cross_attention_dim: width of the context; None for a block without cross-attention.
        activation_fn: feed-forward activation (see :mod:`fusediff.models.feed_forward`).
        attention_bias: whether the q, k, v projections have a bias.
        only_cross_attention: the first attention also attends to the context (no self-attention).
        double_self_attention: the second attention is self-attention (no context projection).
        upcast_attention: recorded on the attentions (the kernel computes in float32 anyway).
        norm_elementwise_affine, norm_eps: the LayerNorms' affine parameters and epsilon.
        final_dropout: dropout after the feed-forward's output projection too.
        ff_inner_dim, ff_bias: the feed-forward's hidden width (4 dim when None) and biases.
        attention_out_bias: whether the attentions' output projections have a bias.
    """

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, dropout: float = 0.0,
                 cross_attention_dim: int | None = None, activation_fn: str = "geglu", attention_bias: bool = False,
                 only_cross_attention: bool = False, double_self_attention: bool = False,
                 upcast_attention: bool = False, norm_elementwise_affine: bool = True, norm_eps: float = 1e-5,
                 final_dropout: bool = False, ff_inner_dim: int | None = None, ff_bias: bool = True,
                 attention_out_bias: bool = True) -> None:
        super().__init__()
        self.only_cross_attention = only_cross_attention
        attn = dict(heads=num_attention_heads, dim_head=attention_head_dim, dropout=dropout, bias=attention_bias,
                    upcast_attention=upcast_attention, out_bias=attention_out_bias, residual_connection=False)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.attn1 = Attention(dim, cross_attention_dim=cross_attention_dim if only_cross_attention else None, **attn)
        if cross_attention_dim is not None or double_self_attention:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
            self.attn2 = Attention(dim, cross_attention_dim=None if double_self_attention else cross_attention_dim,
                                   **attn)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn=activation_fn, final_dropout=final_dropout,
                              inner_dim=ff_inner_dim, bias=ff_bias)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # (B, S, dim), context (B, L, cross_attention_dim) -> (B, S, dim); attention_mask: an additive bias
        # of the first attention, broadcastable to (B, heads, S, S) (diffusers' block gives it to attn1 only)
        context = encoder_hidden_states if self.only_cross_attention else None
        h = hidden_states
        out = self.attn1(layer_norm(self.norm1, h), context, attention_mask)
        if self.attn2 is not None:
            normed, h = layer_norm(self.norm2, out, residual=h)  # h = out + h; normed = norm2(h)
            out = self.attn2(normed, encoder_hidden_states)
        normed, h = layer_norm(self.norm3, out, residual=h)
        return self.ff(normed) + h


class Transformer2DModel(ModelMixin):
    """Transformer over the H*W positions of a (B, C, H, W) map, conditioned on a (B, L, C_ctx) context.

    Args (diffusers' names and defaults; the unsupported ones must keep their defaults):
        num_attention_heads, attention_head_dim: heads and their width; inner = their product.
        in_channels: C (required); out_channels: None or C (the output is added to the input).
        num_layers: number of BasicTransformerBlocks.
        dropout: dropout inside the blocks.
        norm_num_groups: groups of the input GroupNorm.
        cross_attention_dim: width of the context; None for blocks without cross-attention.
        attention_bias: whether the q, k, v projections have a bias.
        activation_fn: feed-forward activation (``geglu``, ``geglu-approximate``, ``gelu``,
            ``gelu-approximate``).
        use_linear_projection: Linear ``proj_in``/``proj_out`` on the sequence instead of 1x1 convs.
        only_cross_attention, double_self_attention, upcast_attention: see BasicTransformerBlock.
        norm_elementwise_affine, norm_eps: the blocks' LayerNorms.
        sample_size, interpolation_scale, use_additional_conditions: used by the patched input
            only; recorded.
        num_vector_embeds, patch_size, num_embeds_ada_norm, caption_channels: must be None;
        norm_type: must be ``"layer_norm"``; attention_type: must be ``"default"``.
    """

    @register_to_config
    def __init__(self, num_attention_heads: int = 16, attention_head_dim: int = 88, in_channels: int | None = None,
                 out_channels: int | None = None, num_layers: int = 1, dropout: float = 0.0,
                 norm_num_groups: int = 32, cross_attention_dim: int | None = None, attention_bias: bool = False,
                 sample_size: int | None = None, num_vector_embeds: int | None = None, patch_size: int | None = None,
                 activation_fn: str = "geglu", num_embeds_ada_norm: int | None = None,
                 use_linear_projection: bool = False, only_cross_attention: bool = False,
                 double_self_attention: bool = False, upcast_attention: bool = False, norm_type: str = "layer_norm",
                 norm_elementwise_affine: bool = True, norm_eps: float = 1e-5, attention_type: str = "default",
                 caption_channels: int | None = None, interpolation_scale: float | None = None,
                 use_additional_conditions: bool | None = None) -> None:
        super().__init__()
        for key, value in (("num_vector_embeds", num_vector_embeds), ("patch_size", patch_size),
                           ("num_embeds_ada_norm", num_embeds_ada_norm), ("caption_channels", caption_channels)):
            if value is not None:
                raise NotImplementedError(f"Transformer2DModel: {key}={value!r} is not supported by fusediff "
                                          "(continuous input with LayerNorm blocks only); it must be None")
        if norm_type != "layer_norm" or attention_type != "default":
            key, value = ("norm_type", norm_type) if norm_type != "layer_norm" else ("attention_type", attention_type)
            raise NotImplementedError(f"Transformer2DModel: {key}={value!r} is not supported by fusediff "
                                      "(only norm_type='layer_norm', attention_type='default')")
        if in_channels is None:
            raise ValueError("Transformer2DModel: in_channels is required (fusediff supports continuous input only)")
        if out_channels not in (None, in_channels):
            raise ValueError(f"Transformer2DModel: out_channels must be None or in_channels={in_channels}, since the "
                             f"output is added to the input; got {out_channels}")
        if num_attention_heads < 1 or attention_head_dim < 1 or num_layers < 0:
            raise ValueError(f"Transformer2DModel: needs num_attention_heads >= 1, attention_head_dim >= 1 and "
                             f"num_layers >= 0; got {num_attention_heads}, {attention_head_dim}, {num_layers}")
        inner = num_attention_heads * attention_head_dim
        self.in_channels, self.inner_dim = in_channels, inner
        self.use_linear_projection = use_linear_projection

        self.norm = GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, kernel_size=1)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, num_attention_heads, attention_head_dim, dropout=dropout,
                                  cross_attention_dim=cross_attention_dim, activation_fn=activation_fn,
                                  attention_bias=attention_bias, only_cross_attention=only_cross_attention,
                                  double_self_attention=double_self_attention, upcast_attention=upcast_attention,
                                  norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps)
            for _ in range(num_layers)])
        if use_linear_projection:
            self.proj_out = nn.Linear(inner, in_channels)
        else:
            self.proj_out = nn.Conv2d(inner, in_channels, kernel_size=1)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                timestep: torch.Tensor | None = None, added_cond_kwargs: dict[str, torch.Tensor] | None = None,
                class_labels: torch.Tensor | None = None, cross_attention_kwargs: dict[str, Any] | None = None,
                attention_mask: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                return_dict: bool = True) -> Transformer2DModelOutput | tuple:
        """(B, C, H, W) map and (B, L, cross_attention_dim) context -> :class:`Transformer2DModelOutput` (B, C, H, W).

        ``timestep``, ``class_labels`` and ``added_cond_kwargs`` (AdaLayerNorm inputs), masks and
        ``cross_attention_kwargs`` must be None (or empty). With ``return_dict=False``, returns ``(sample,)``.
        """
        refuse_unsupported("Transformer2DModel", timestep=timestep, added_cond_kwargs=added_cond_kwargs,
                           class_labels=class_labels, cross_attention_kwargs=cross_attention_kwargs,
                           attention_mask=attention_mask, encoder_attention_mask=encoder_attention_mask)
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 4 \
                or hidden_states.shape[1] != self.in_channels:
            got = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states)
            raise ValueError(f"Transformer2DModel: hidden_states must have shape (B, {self.in_channels}, H, W); "
                             f"got {got}")
        batch, channels, height, width = hidden_states.shape
        layout = memory_format_of(hidden_states)  # the map goes back to the input's layout: no copy in channels-last
        h = self.norm(hidden_states)  # (B, C, H, W)
        # (B, C, H, W) -> (B, H*W, C): a view of a channels-last map, a copy of a contiguous one
        if self.use_linear_projection:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(batch, height * width, channels))  # (B, S, inner)
        else:
            h = self.proj_in(h).permute(0, 2, 3, 1).reshape(batch, height * width, self.inner_dim)  # (B, S, inner)
        for block in self.transformer_blocks:
            h = block(h, encoder_hidden_states)
        if self.use_linear_projection:
            h = self.proj_out(h).reshape(batch, height, width, channels).permute(0, 3, 1, 2).contiguous(
                memory_format=layout)
        else:
            h = self.proj_out(h.reshape(batch, height, width, self.inner_dim).permute(0, 3, 1, 2).contiguous(
                memory_format=layout))
        out = h + hidden_states  # (B, C, H, W)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)
