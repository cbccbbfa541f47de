"""Multi-head attention of the UNets: spatial self-attention and the (cross-)attention of transformer blocks.

Multi-head attention (Vaswani et al. 2017, arXiv:1706.03762, Sec. 3.2) of queries from x over
keys and values from a context c, which is x itself (self-attention) or the encoder's hidden
states (cross-attention, the text conditioning of latent diffusion: Rombach et al. 2022,
arXiv:2112.10752, Sec. 3.3):

    h       = GroupNorm(x)                                      optional
    q       = h W_q,  k = c W_k,  v = c W_v                     (B, heads, S, D), (B, heads, L, D)
    o       = softmax(q k^T / sqrt(D)) v                        fusediff.kernels.attention
    out     = (o W_out [+ x]) / rescale_output_factor           residual optional

x is either a (B, C, H, W) feature map, whose S = H*W positions attend to each other (the
spatial block of DDPM, Ho et al. 2020, Appendix B, after the non-local block of Wang et al.
2018, arXiv:1711.07971), or a (B, S, C) sequence, as inside a transformer block; c is
(B, L, cross_attention_dim). It holds the subset of diffusers' ``Attention`` that fusediff's
UNets and VAEs use, with the same parameter names (``group_norm``, ``to_q``, ``to_k``, ``to_v``,
``to_out.0``) so checkpoints load in both. The head count is given; the projections are
``heads * dim_head`` wide, which is less than C when the heads do not divide it.

Precision: :func:`fusediff.kernels.attention` always forms q k^T and the softmax in float32,
which is what diffusers' ``upcast_attention`` asks for, so that flag needs no extra work here.
An ``attention_mask`` is an additive bias over the keys (unCLIP's prior: a causal mask plus the
text padding); a masked call runs :func:`~fusediff.models.attention_mask.biased_attention` (PyTorch's
SDPA) instead of the kernel, which takes no mask. No added key/value projections, no q/k norms.

Self-attention on a CUDA device projects q, k and v with one matmul of h by the stacked weights
[W_q; W_k; W_v] (one launch instead of three; q, k and v are strided views of its output, which the
attention kernel reads in place); cross-attention projects k and v with one matmul of the context by
[W_k; W_v] the same way. The stacked weight is built once and kept while the three weights are
unchanged (no autograd: their data pointers and version counters are compared); with gradients it is
stacked at every call, so gradients reach to_q, to_k and to_v as before, and a CUDA graph stacks it in
each replay (one copy of the three weights per self-attention per replay), so a replay
sees weights changed in place after the capture. Weights written through ``.data`` bump no version
counter: call ``attention._qkv_cache = attention._kv_cache = None`` (or use in-place ops under ``torch.no_grad()``)
after such writes. Each output element is the
same dot product, but the matmul library may block a wider product differently, so on CUDA q, k and v
can differ from three separate matmuls in the last bits; CPU tensors take the three matmuls, and the
weights keep diffusers' names on disk.

Older checkpoints (written for diffusers' since-removed ``AttentionBlock``) name the projections
``query``, ``key``, ``value`` and ``proj_attn``; :func:`convert_legacy_attention_keys` renames them.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .activations import dropout
from .attention_mask import biased_attention
from .layout import memory_format_of
from .normalization import GroupNorm
from .stacked import capturing as _capturing
from .stacked import stack_linears


FUSED_QKV_DEVICES = ("cuda",)  # device types where self-attention projects q, k and v with one matmul


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, heads * D) -> (B, heads, S, D), a view."""
    batch, seq, width = x.shape
    return x.view(batch, seq, heads, width // heads).transpose(1, 2)


def check_context(owner: str, context: Any, batch: int, width: int) -> None:
    """ValueError unless ``context`` is a (batch, L, width) tensor."""
    if not isinstance(context, torch.Tensor) or context.dim() != 3 or context.shape[0] != batch \
            or context.shape[2] != width:
        got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
        raise ValueError(f"{owner}: encoder_hidden_states must have shape ({batch}, L, {width}); got {got}")


class Attention(nn.Module):
    """Multi-head attention of a (B, C, H, W) map or a (B, S, C) sequence over itself or a (B, L, C_ctx) context.

    Args:
        channels: C, the input (and output) channel count (diffusers' ``query_dim``).
        heads: number of attention heads.
        dim_head: D, the width of one head; C when None.
        norm_num_groups: GroupNorm groups applied to the input first, or None for no norm.
        eps: GroupNorm epsilon.
        rescale_output_factor: divides the output (after the residual).
        residual_connection: add the input to the output.
        bias: whether the q, k, v projections have a bias.
        dropout: dropout probability after the output projection.
        cross_attention_dim: C_ctx, the width of the context the keys and values are projected
            from; None for self-attention (C_ctx = C).
        upcast_attention: diffusers' flag for q k^T and softmax in float32; the kernel always
            computes them so (see the module docstring), so it is recorded only.
        out_bias: whether the output projection has a bias.
    """

    def __init__(self, channels: int, heads: int = 1, dim_head: int | None = None, norm_num_groups: int | None = None,
                 eps: float = 1e-5, rescale_output_factor: float = 1.0, residual_connection: bool = True,
                 bias: bool = True, dropout: float = 0.0, cross_attention_dim: int | None = None,
                 upcast_attention: bool = False, out_bias: bool = True) -> None:
        super().__init__()
        dim_head = channels if dim_head is None else dim_head
        if heads < 1 or dim_head < 1:
            raise ValueError(f"Attention: needs at least one head of width >= 1; got heads={heads}, "
                             f"dim_head={dim_head} for {channels} channels")
        self.channels, self.heads, self.dim_head = channels, heads, dim_head
        self.rescale_output_factor = rescale_output_factor
        self.residual_connection = residual_connection
        self.is_cross_attention = cross_attention_dim is not None
        self.cross_attention_dim = channels if cross_attention_dim is None else cross_attention_dim
        self.upcast_attention = upcast_attention
        inner = heads * dim_head
        self.group_norm = None if norm_num_groups is None else GroupNorm(norm_num_groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, inner, bias=bias)
        self.to_k = nn.Linear(self.cross_attention_dim, inner, bias=bias)
        self.to_v = nn.Linear(self.cross_attention_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, channels, bias=out_bias), nn.Dropout(dropout)])
        self._qkv_cache: tuple | None = None  # (key, stacked weight, stacked bias, params): see _stacked_qkv
        self._kv_cache: tuple | None = None  # the same for [W_k; W_v] of a cross-attention

    def _stacked(self, layers: tuple[nn.Linear, ...], cache: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weights of ``layers`` stacked ([W_q; W_k; W_v], or [W_k; W_v]) and their stacked biases (or None),
        kept in the attribute ``cache`` (:func:`stacked.stack_linears`). Stacked anew under torch.compile and
        inside a CUDA-graph capture: a replay must read the weights as they are then (changed in place or
        not), not a copy made when the graph was recorded."""
        anew = torch.compiler.is_compiling() or _capturing(layers[0].weight.device)
        return stack_linears(self, cache, layers, anew)

    def _stacked_qkv(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[W_q; W_k; W_v] (3 * inner, C) and the stacked biases (or None); see :meth:`_stacked`."""
        return self._stacked((self.to_q, self.to_k, self.to_v), "_qkv_cache")

    def _fuse_qkv(self, h: torch.Tensor) -> bool:
        """Whether q, k, v of this self-attention call come from one matmul (see the module docstring)."""
        return (h.device.type in FUSED_QKV_DEVICES and self.cross_attention_dim == self.channels
                and (self.to_q.bias is None) == (self.to_k.bias is None) == (self.to_v.bias is None))

    def _fuse_kv(self, context: torch.Tensor) -> bool:
        """Whether k and v of this cross-attention call come from one matmul of the context."""
        return context.device.type in FUSED_QKV_DEVICES and (self.to_k.bias is None) == (self.to_v.bias is None)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # (B, C, H, W) or (B, S, C), context (B, L, C_ctx) or None -> the input's shape;
        # attention_mask: an additive bias broadcastable to (B, heads, S, L), or None
        residual = hidden_states
        spatial = hidden_states.dim() == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            h = hidden_states if self.group_norm is None else self.group_norm(hidden_states)
            h = h.reshape(batch, channels, height * width).transpose(1, 2)  # (B, S, C), a view if channels-last
        else:
            h = hidden_states  # (B, S, C)
            if self.group_norm is not None:
                h = self.group_norm(h.transpose(1, 2)).transpose(1, 2)
        batch, seq, _ = h.shape
        if encoder_hidden_states is None:
            if self.is_cross_attention and self.cross_attention_dim != self.channels:
                raise ValueError("Attention: this cross-attention needs encoder_hidden_states of width "
                                 f"{self.cross_attention_dim}")
            context = h
        else:
            check_context("Attention", encoder_hidden_states, batch, self.cross_attention_dim)
            context = encoder_hidden_states  # (B, L, C_ctx)
        if context is h and self._fuse_qkv(h):
            weight, bias = self._stacked_qkv()
            qkv = F.linear(h, weight, bias).view(batch, seq, 3, self.heads, self.dim_head)  # (B, S, 3, heads, D)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, heads, S, D) strided views
        elif context is not h and self._fuse_kv(context):
            q = split_heads(self.to_q(h), self.heads)  # (B, heads, S, D)
            weight, bias = self._stacked((self.to_k, self.to_v), "_kv_cache")
            kv = F.linear(context, weight, bias).view(batch, context.shape[1], 2, self.heads, self.dim_head)
            k, v = (kv[:, :, i].transpose(1, 2) for i in range(2))  # (B, heads, L, D) strided views
        else:
            q = split_heads(self.to_q(h), self.heads)  # (B, heads, S, D)
            k = split_heads(self.to_k(context), self.heads)  # (B, heads, L, D)
            v = split_heads(self.to_v(context), self.heads)
        if attention_mask is None:
            o = kernels.attention(q, k, v, out_layout="bshd")  # (B, heads, S, D) laid out as (B, S, heads, D)
        else:
            o = biased_attention(q, k, v, attention_mask)  # (B, heads, S, D)
        o = o.transpose(1, 2).reshape(batch, seq, self.heads * self.dim_head)  # (B, S, heads * D), a view
        out = dropout(self.to_out[1], self.to_out[0](o))  # (B, S, C)
        if spatial:
            out = out.transpose(1, 2).reshape(residual.shape)  # (B, C, H, W), a view laid out channels-last
            if not self.residual_connection:
                out = out.contiguous(memory_format=memory_format_of(residual))
        if self.residual_connection:
            out = residual + out  # in the input's layout (the sum takes its first operand's)
        return out / self.rescale_output_factor if self.rescale_output_factor != 1.0 else out


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
