"""Spatial attention over a feature map and an added context: the attention of DeepFloyd IF's (and unCLIP's) UNets.

    h    = GroupNorm(x)                                    x: (B, C, H, W) -> h: (B, S, C), S = H*W
    c    = GroupNorm_32(c) over its channels                c: (B, L, C_ctx); with cross_attention_norm="group_norm"
    q    = h W_q                                           (B, heads, S, D)
    k    = [c W_k' ; h W_k],   v = [c W_v' ; h W_v]        (B, heads, L + S, D): the L context tokens first
    out  = x + softmax(q k^T / sqrt(D)) v W_out            (B, C, H, W)

The text conditioning of GLIDE (Nichol et al. 2021, arXiv:2112.10741, Sec. 4): the encoder's
token embeddings are projected into every attention layer of the ADM UNet (W_k', W_v') and
concatenated to the keys and values its positions attend over, which Imagen-style cascades
(DeepFloyd IF) inherit. With ``only_cross_attention`` the map attends to the context alone (no
W_k, W_v). This is diffusers' ``Attention`` with ``added_kv_proj_dim`` as its
``AttnAddedKVProcessor`` (and the SDPA variant, the same function) computes it, with the same
parameter names (``group_norm``, ``norm_cross``, ``to_q``, ``to_k``, ``to_v``, ``add_k_proj``,
``add_v_proj``, ``to_out.0``), created in the same order so a seeded initialisation matches.

Both GroupNorms run :func:`fusediff.kernels.group_norm` and the attention
:func:`fusediff.kernels.attention` (q k^T and the softmax in float32, diffusers' ``upcast_softmax``).
An ``attention_mask`` is an additive bias over the L context tokens (unCLIP's decoder masks the text
padding; the map's own S keys get 0), run by :func:`~fusediff.models.attention_mask.biased_attention`
(PyTorch's SDPA, as diffusers' processor) since the kernel takes no mask. diffusers pads the (B, 1, L)
bias by S zeros only when L != S (and fails when L == S, or with ``only_cross_attention``); here the
bias must cover the L context tokens and is padded to the keys there are.

Limits: the heads must tile the channels exactly (heads * D = C, as diffusers' processor
assumes); a context is required; the context's GroupNorm has diffusers' fixed
32 groups and eps 1e-5 (``cross_attention_norm="layer_norm"`` is not supported).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from .activations import dropout
from .attention import check_context, split_heads
from .attention_mask import biased_attention
from .normalization import GroupNorm

CROSS_ATTENTION_NORMS = (None, "group_norm")
CROSS_NORM_GROUPS = 32  # diffusers' cross_attention_norm_num_groups, which its UNet blocks never change


class AddedKVAttention(nn.Module):
    """Self-attention of a (B, C, H, W) map whose keys and values also hold a projected (B, L, C_ctx) context.

    Args:
        channels: C, the map's channels (diffusers' ``query_dim``).
        heads: number of heads; ``heads * dim_head`` must equal ``channels``.
        dim_head: D, the width of one head.
        added_kv_proj_dim: C_ctx, the width of the context the added keys and values are projected from.
        norm_num_groups: groups of the GroupNorm applied to the map first.
        eps: epsilon of that GroupNorm.
        only_cross_attention: attend to the context only (no ``to_k``/``to_v`` of the map).
        cross_attention_norm: None, or ``"group_norm"`` to normalise the context over its channels first.
        dropout: dropout probability after the output projection.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, added_kv_proj_dim: int, norm_num_groups: int,
                 eps: float = 1e-5, only_cross_attention: bool = False, cross_attention_norm: str | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if heads < 1 or dim_head < 1 or heads * dim_head != channels:
            raise ValueError(f"AddedKVAttention: {heads} heads of width {dim_head} must tile the {channels} channels "
                             "exactly (attention_head_dim is the head width here and must divide the channels)")
        if cross_attention_norm not in CROSS_ATTENTION_NORMS:
            raise ValueError(f"AddedKVAttention: cross_attention_norm must be one of {CROSS_ATTENTION_NORMS}; "
                             f"got {cross_attention_norm!r}")
        if cross_attention_norm == "group_norm" and added_kv_proj_dim % CROSS_NORM_GROUPS:
            raise ValueError(f"cross_attention_norm='group_norm' normalises the context in {CROSS_NORM_GROUPS} groups "
                             f"(diffusers' fixed count): cross_attention_dim={added_kv_proj_dim} is not a multiple "
                             f"of {CROSS_NORM_GROUPS}")
        self.channels, self.heads, self.dim_head = channels, heads, dim_head
        self.added_kv_proj_dim = added_kv_proj_dim
        self.only_cross_attention = only_cross_attention
        self.group_norm = GroupNorm(norm_num_groups, channels, eps=eps)
        self.norm_cross = (GroupNorm(CROSS_NORM_GROUPS, added_kv_proj_dim, eps=1e-5)
                           if cross_attention_norm == "group_norm" else None)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = None if only_cross_attention else nn.Linear(channels, channels)
        self.to_v = None if only_cross_attention else nn.Linear(channels, channels)
        self.add_k_proj = nn.Linear(added_kv_proj_dim, channels)
        self.add_v_proj = nn.Linear(added_kv_proj_dim, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(dropout)])

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # hidden_states (B, C, H, W), encoder_hidden_states (B, L, C_ctx) -> (B, C, H, W);
        # attention_mask: an additive bias (B, L) or (B, 1, L) over the context tokens, or None
        batch, channels, height, width = hidden_states.shape
        check_context("AddedKVAttention", encoder_hidden_states, batch, self.added_kv_proj_dim)
        if attention_mask is not None:
            attention_mask = self._key_bias(attention_mask, batch, encoder_hidden_states.shape[1], height * width)
        context = encoder_hidden_states
        if self.norm_cross is not None:
            context = self.norm_cross(context.transpose(1, 2)).transpose(1, 2)  # normed over C_ctx: (B, L, C_ctx)
        h = self.group_norm(hidden_states).reshape(batch, channels, height * width).transpose(1, 2)  # (B, S, C)
        q = split_heads(self.to_q(h), self.heads)  # (B, heads, S, D)
        k = split_heads(self.add_k_proj(context), self.heads)  # (B, heads, L, D)
        v = split_heads(self.add_v_proj(context), self.heads)
        if not self.only_cross_attention:
            k = torch.cat([k, split_heads(self.to_k(h), self.heads)], dim=2)  # (B, heads, L + S, D)
            v = torch.cat([v, split_heads(self.to_v(h), self.heads)], dim=2)
        if attention_mask is None:
            o = kernels.attention(q, k, v, out_layout="bshd")  # (B, heads, S, D) laid out as (B, S, heads, D)
        else:
            o = biased_attention(q, k, v, attention_mask)  # (B, heads, S, D)
        o = o.transpose(1, 2).reshape(batch, height * width, channels)  # (B, S, C)
        out = dropout(self.to_out[1], self.to_out[0](o))  # (B, S, C)
        return hidden_states + out.transpose(1, 2).reshape(hidden_states.shape)  # in the input's layout

    def _key_bias(self, bias: torch.Tensor, batch: int, context_len: int, seq: int) -> torch.Tensor:
        """The (B, L) or (B, 1, L) context bias as (B, 1, 1, keys): zeros appended for the map's S keys."""
        if not isinstance(bias, torch.Tensor) or bias.dim() not in (2, 3) or bias.shape[0] != batch \
                or bias.shape[-1] != context_len or (bias.dim() == 3 and bias.shape[1] != 1):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"AddedKVAttention: attention_mask must be a ({batch}, {context_len}) or "
                             f"({batch}, 1, {context_len}) bias over the context tokens; got {got}")
        bias = bias.reshape(batch, 1, 1, context_len)
        if not self.only_cross_attention:
            bias = torch.nn.functional.pad(bias, (0, seq), value=0.0)  # the map's own keys: not masked
        return bias
