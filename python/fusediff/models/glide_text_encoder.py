"""GLIDE's text encoder: a transformer over BPE tokens whose outputs condition GLIDE's UNet.

    x      = E_tok[ids] + P                                   (B, L, W), L = text_ctx (128), W = xf_width (512)
    x      = where(mask, x, P_pad)                            padded positions take a learned embedding
    x      = x + attn(LN_1(x)); x = x + MLP(LN_2(x))          per block: pre-norm, no causal mask
    x      = LN_f(x)                                          (B, L, W): the tokens every UNet attention attends to
    proj   = W_proj x[:, -1]                                  (B, 4 C_0): added to the UNet's time embedding

Nichol et al. 2021 (arXiv:2112.10741), Sec. 4 ("Text-conditional diffusion models"): the last
token's embedding, projected, joins the timestep embedding and the whole sequence is projected into
every attention layer of the UNet. The structure and parameter names are glide-text2im's
(``Text2ImUNet``'s ``token_embedding``, ``positional_embedding``, ``padding_embedding``,
``transformer.resblocks.<i>.{ln_1, attn.c_qkv, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}``,
``final_ln``, ``transformer_proj``; the transformer is adapted from CLIP's, in ``xf.py``), so a
checkpoint's text-encoder tensors map one to one. ``c_qkv`` packs q, k and v per head
([q_h | k_h | v_h] for head h), as the checkpoint does; the heads are read from it as strided views.

Kernels: LayerNorm through :func:`fusediff.kernels.layer_norm` on float32 inputs (glide-text2im's
``LayerNorm`` computes in float32 and rounds once to the model's dtype; so does this one) and
attention through :func:`fusediff.kernels.attention`. Limits: no attention mask (GLIDE uses the
padding embedding instead), no causal mask, forward only of what sampling needs (GLIDE's
autoregressive ``unemb`` head, ``xf_ar``, is not built: the released models do not use it).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..configuration import register_to_config
from ..modeling import ModelMixin
from ..utils.outputs import BaseOutput


@dataclasses.dataclass
class GlideTextEncoderOutput(BaseOutput):
    """``text_embeds`` (B, time_embed_dim): the projected last token; ``last_hidden_state`` (B, L, W)."""

    text_embeds: torch.Tensor
    last_hidden_state: torch.Tensor


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 and rounded once to the input's dtype (glide-text2im's ``xf.LayerNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.layer_norm(x.float(), self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class MultiheadAttention(nn.Module):
    """Self-attention with q, k, v packed per head in one projection (``c_qkv``), then ``c_proj``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_qkv = nn.Linear(width, width * 3)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, W) -> (B, L, W)
        batch, length, width = x.shape
        qkv = self.c_qkv(x).view(batch, length, self.heads, -1)  # (B, L, H, 3D): [q_h | k_h | v_h]
        q, k, v = (t.transpose(1, 2) for t in qkv.split(width // self.heads, dim=-1))  # (B, H, L, D) views
        o = kernels.attention(q, k, v, out_layout="bshd")  # (B, H, L, D) laid out as (B, L, H, D)
        return self.c_proj(o.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, width * 4)
        self.c_proj = nn.Linear(width * 4, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))  # exact (erf) GELU, as torch.nn.GELU()


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm32(width)
        self.mlp = MLP(width)
        self.ln_2 = LayerNorm32(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class GlideTextEncoder(ModelMixin):
    """GLIDE's text transformer: (B, L) token ids and their mask to the UNet's two text inputs.

    Args (glide-text2im's ``model_and_diffusion_defaults`` in brackets):
        vocab_size: rows of the token embedding, the tokenizer's vocabulary (50257, GPT-2's BPE);
            the padding token is ``vocab_size - 1``, as glide-text2im's ``end_token``.
        text_ctx: tokens per text, L (128).
        width: transformer width W, ``xf_width`` (512); also the UNet's cross-attention width.
        layers, heads: ``xf_layers`` (16) and ``xf_heads`` (8).
        final_ln: a LayerNorm after the last block, ``xf_final_ln`` (True).
        padding: padded positions take ``padding_embedding``, ``xf_padding`` (True).
        time_embed_dim: width of ``transformer_proj``'s output, 4 x the UNet's ``num_channels``.
    """

    _diffusers_library = "fusediff"  # model_index.json entry: diffusers has no GLIDE

    @register_to_config
    def __init__(self, vocab_size: int = 50257, text_ctx: int = 128, width: int = 512, layers: int = 16,
                 heads: int = 8, final_ln: bool = True, padding: bool = True, time_embed_dim: int = 768) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"GlideTextEncoder: width {width} must be a multiple of heads {heads}")
        self.transformer = Transformer(width, layers, heads)
        self.final_ln = LayerNorm32(width) if final_ln else None
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(text_ctx, width) * 0.01)
        self.padding_embedding = nn.Parameter(torch.randn(text_ctx, width) * 0.01) if padding else None
        self.transformer_proj = nn.Linear(width, time_embed_dim)

    @property
    def pad_token_id(self) -> int:
        """The id that pads a text to ``text_ctx`` tokens: the last of the vocabulary (GLIDE's ``end_token``)."""
        return self.config.vocab_size - 1

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_dict: bool = True) -> GlideTextEncoderOutput | tuple:
        """``input_ids`` (B, text_ctx) ints; ``attention_mask`` (B, text_ctx), True for text and False for
        padding (required when the model has a padding embedding)."""
        ctx = self.config.text_ctx
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] != ctx \
                or input_ids.is_floating_point():
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"GlideTextEncoder: input_ids must be a (B, {ctx}) integer tensor; got {got}")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size:
            raise ValueError(f"GlideTextEncoder: token ids must be in [0, {self.config.vocab_size})")
        x = self.token_embedding(input_ids.long()) + self.positional_embedding[None]  # (B, L, W)
        if self.padding_embedding is not None:
            if attention_mask is None or tuple(attention_mask.shape) != tuple(input_ids.shape):
                got = None if attention_mask is None else tuple(attention_mask.shape)
                raise ValueError(f"GlideTextEncoder: attention_mask of shape {tuple(input_ids.shape)} is required "
                                 f"(True = text, False = padding); got {got}")
            x = torch.where(attention_mask.to(device=x.device, dtype=torch.bool)[..., None], x,
                            self.padding_embedding[None])
        x = self.transformer(x.to(self.dtype))
        if self.final_ln is not None:
            x = self.final_ln(x)
        proj = self.transformer_proj(x[:, -1])  # (B, time_embed_dim): the last position's output
        if not return_dict:
            return proj, x
        return GlideTextEncoderOutput(text_embeds=proj, last_hidden_state=x)
