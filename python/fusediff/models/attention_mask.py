"""Attention with an additive mask: the masked attentions of unCLIP's prior and decoder.

    bias = (1 - keep) * -10000                       keep: 1 = attend, 0 = masked (diffusers' constant)
    out  = softmax(q k^T / sqrt(D) + bias) v          bias broadcast to (B, heads, S, L)

:func:`fusediff.kernels.attention` takes no mask, so a masked call runs PyTorch's
``scaled_dot_product_attention`` with the bias as ``attn_mask``, which is also what diffusers'
SDPA processors run, on every device. Unmasked calls keep the fused kernel. Masks are diffusers'
"soft" -10000 biases, not -inf, so a fully masked row still averages every value (as in diffusers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MASKED_BIAS = -10000.0  # what diffusers adds to the logits of a masked key


def mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive bias (1 - mask) * -10000 of a keep-mask (bool or 0/1), in ``dtype``."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor; got {type(mask).__name__}")
    return (1 - mask.to(dtype)) * MASKED_BIAS


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + bias) v for q (B, heads, S, D), k and v (B, heads, L, D); bias broadcastable
    to (B, heads, S, L). Returns (B, heads, S, D)."""
    batch, heads, seq, _ = q.shape
    try:
        torch.broadcast_shapes(bias.shape, (batch, heads, seq, k.shape[2]))
    except RuntimeError:
        raise ValueError(f"attention mask of shape {tuple(bias.shape)} does not broadcast to the attention's "
                         f"(B, heads, S, L) = {(batch, heads, seq, k.shape[2])}") from None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
