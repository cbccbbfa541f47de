"""Spatial self-attention block of the DDPM UNet: every pixel attends to every pixel.

The block of DDPM (Ho et al. 2020, Appendix B, after the non-local block of Wang et al. 2018,
arXiv:1711.07971) with multi-head attention (Vaswani et al. 2017, arXiv:1706.03762, Sec. 3.2):

    h       = GroupNorm(x)                                      (B, C, H, W), optional
    q, k, v = h W_q, h W_k, h W_v over the S = H*W positions    (B, heads, S, D) each
    o       = softmax(q k^T / sqrt(D)) v                        fusediff.kernels.attention
    out     = (o W_out + x) / rescale_output_factor             residual optional

It holds the subset of diffusers' ``Attention`` that UNet2DModel's blocks use, with the same
parameter names (``group_norm``, ``to_q``, ``to_k``, ``to_v``, ``to_out.0``) so checkpoints
load in both. The head count is ``channels // dim_head`` and the projections are
``heads * dim_head`` wide, which is less than ``channels`` when ``dim_head`` does not divide it.

Older checkpoints (written for diffusers' since-removed ``AttentionBlock``) name the projections
``query``, ``key``, ``value`` and ``proj_attn``; :func:`convert_legacy_attention_keys` renames them.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .. import kernels
from .normalization import GroupNorm


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions of a (B, C, H, W) feature map.

    Args:
        channels: C, the input (and output) channel count.
        heads: number of attention heads.
        dim_head: D, the width of one head.
        norm_num_groups: GroupNorm groups applied to the input first, or None for no norm.
        eps: GroupNorm epsilon.
        rescale_output_factor: divides the output (after the residual).
        residual_connection: add the input to the output.
        bias: whether the q, k, v projections have a bias (the output projection always has one).
        dropout: dropout probability after the output projection.
    """

    def __init__(self, channels: int, heads: int = 1, dim_head: int | None = None, norm_num_groups: int | None = None,
                 eps: float = 1e-5, rescale_output_factor: float = 1.0, residual_connection: bool = True,
                 bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        dim_head = channels if dim_head is None else dim_head
        if heads < 1 or dim_head < 1:
            raise ValueError(f"Attention: needs at least one head of width >= 1; got heads={heads}, "
                             f"dim_head={dim_head} for {channels} channels")
        self.channels, self.heads, self.dim_head = channels, heads, dim_head
        self.rescale_output_factor = rescale_output_factor
        self.residual_connection = residual_connection
        inner = heads * dim_head
        self.group_norm = None if norm_num_groups is None else GroupNorm(norm_num_groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, inner, bias=bias)
        self.to_k = nn.Linear(channels, inner, bias=bias)
        self.to_v = nn.Linear(channels, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, channels), nn.Dropout(dropout)])

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape  # (B, S, heads * D)
        return x.view(batch, seq, self.heads, self.dim_head).transpose(1, 2)  # (B, heads, S, D)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        residual = hidden_states
        batch, channels, height, width = hidden_states.shape
        h = hidden_states if self.group_norm is None else self.group_norm(hidden_states)
        h = h.reshape(batch, channels, height * width).transpose(1, 2)  # (B, S, C)
        q = self._split_heads(self.to_q(h))  # (B, heads, S, D)
        k = self._split_heads(self.to_k(h))
        v = self._split_heads(self.to_v(h))
        o = kernels.attention(q, k, v)  # (B, heads, S, D), scale 1/sqrt(D)
        o = o.transpose(1, 2).reshape(batch, height * width, self.heads * self.dim_head)  # (B, S, heads * D)
        o = self.to_out[1](self.to_out[0](o))  # (B, S, C)
        out = o.transpose(1, 2).reshape(batch, channels, height, width)  # (B, C, H, W)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor


_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_KEY = re.compile(r"^(.*attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def convert_legacy_attention_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` with the legacy ``AttentionBlock`` names (``attentions.N.query.weight`` ...) renamed.

    ``query``/``key``/``value``/``proj_attn`` under an ``attentions.N`` module become
    ``to_q``/``to_k``/``to_v``/``to_out.0``; every other key is kept as it is.
    """
    converted = {}
    for name, tensor in state_dict.items():
        match = _LEGACY_KEY.match(name)
        if match:
            prefix, old, kind = match.groups()
            name = f"{prefix}.{_LEGACY_NAMES[old]}.{kind}"
        converted[name] = tensor
    return converted
