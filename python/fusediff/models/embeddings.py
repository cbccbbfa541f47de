"""Embeddings of the diffusion time (and of class labels) that condition a UNet.

- :class:`Timesteps`: the sinusoidal embedding of the Transformer (Vaswani et al. 2017,
  arXiv:1706.03762, Sec. 3.5) used for t by DDPM (Ho et al. 2020, Appendix B), computed by
  :func:`fusediff.kernels.timestep_embedding`. No parameters.
- :class:`GaussianFourierProjection`: random Fourier features of log(sigma) (Tancik et al.
  2020, arXiv:2006.10739), the noise-level embedding of score-based SDE models (Song et al.
  2021, arXiv:2011.13456, the NCSN++ models). Its frequencies are a fixed, saved parameter.
- :class:`TimestepEmbedding`: the two-layer MLP (Linear, SiLU, Linear) that maps either of
  the above to the width the residual blocks take.
- :func:`embed_timesteps`: Timesteps, a cast and a SiLU TimestepEmbedding in one fused op
  (:func:`fusediff.kernels.timestep_mlp`) where the kernels run, the two modules otherwise.
- :class:`TextTimeEmbedding`: a pooled text embedding added to the time embedding (DeepFloyd IF's
  ``addition_embed_type="text"``): LayerNorm, :class:`AttentionPooling`, Linear, LayerNorm. The
  pooling is the attention pooling of CLIP's ResNet image encoder (Radford et al. 2021,
  arXiv:2103.00020, Sec. 2.4), which GLIDE (Nichol et al. 2021, arXiv:2112.10741, Sec. 4) and
  IF apply to the text tokens: one query, the mean token plus a learned position, attends over
  [mean; tokens]; the pooled vector is the multi-head output of that query (no output projection).
  Its attention runs :func:`fusediff.kernels.attention`, its LayerNorms :func:`fusediff.kernels.layer_norm`.

Parameter names match diffusers' (``linear_1``, ``linear_2``, ``weight``; ``norm1``, ``pool``,
``proj``, ``norm2``), so checkpoints load in both libraries.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import kernels
from .activations import get_activation
from .attention import split_heads
from .normalization import layer_norm


class Timesteps(nn.Module):
    """Sinusoidal embedding (N,) -> (N, num_channels) float32 of timesteps.

    Args:
        num_channels: width of the embedding.
        flip_sin_to_cos: put the cosines first (as ADM and most diffusers UNets do).
        downscale_freq_shift: s in the frequency spacing max_period^(-j / (half - s)).
        scale: multiplies the angles.
    """

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float,
                 scale: float = 1) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = bool(flip_sin_to_cos)
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, num_channels)
        return kernels.timestep_embedding(timesteps, self.num_channels, flip_sin_to_cos=self.flip_sin_to_cos,
                                          downscale_freq_shift=self.downscale_freq_shift, scale=self.scale)

    def extra_repr(self) -> str:
        return (f"num_channels={self.num_channels}, flip_sin_to_cos={self.flip_sin_to_cos}, "
                f"downscale_freq_shift={self.downscale_freq_shift}, scale={self.scale}")


class GaussianFourierProjection(nn.Module):
    """Fourier features [sin(2 pi w x), cos(2 pi w x)] of x = log(sigma), w ~ N(0, scale^2) fixed.

    Args:
        embedding_size: number of frequencies w; the output has twice as many columns.
        scale: standard deviation of the frequencies at initialisation.
        log: embed log(x) rather than x (x is a noise level sigma > 0).
        flip_sin_to_cos: put the cosines first.
    """

    def __init__(self, embedding_size: int = 256, scale: float = 1.0, log: bool = True,
                 flip_sin_to_cos: bool = False) -> None:
        super().__init__()
        # diffusers draws the frequencies twice and keeps the second draw; doing the same keeps a
        # seeded initialisation identical to diffusers' (the first draw is discarded).
        torch.randn(embedding_size)
        self.weight = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)  # (E,)
        self.log = log
        self.flip_sin_to_cos = flip_sin_to_cos

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, 2E)
        if self.log:
            x = torch.log(x)
        angles = x[:, None] * self.weight[None, :] * 2 * math.pi  # (N, E)
        sin, cos = torch.sin(angles), torch.cos(angles)
        return torch.cat([cos, sin] if self.flip_sin_to_cos else [sin, cos], dim=-1)


class TimestepEmbedding(nn.Module):
    """MLP (N, in_channels) -> (N, out_dim or time_embed_dim): ``linear_2(act(linear_1(x)))``.

    With ``cond_proj_dim`` the input is first shifted by a projected condition,
    ``x + cond_proj(c)``: the guidance embedding of latent consistency models (a UNet's
    ``time_cond_proj_dim``). ``cond_proj`` is created after ``linear_1``, as diffusers creates it,
    so seeded initialisations agree.
    """

    def __init__(self, in_channels: int, time_embed_dim: int, act_fn: str = "silu",
                 cond_proj_dim: int | None = None, out_dim: int | None = None) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.cond_proj = None if cond_proj_dim is None else nn.Linear(cond_proj_dim, in_channels, bias=False)
        self.act = get_activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim if out_dim is None else out_dim)

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        # (N, in_channels), condition (N, cond_proj_dim) -> (N, time_embed_dim)
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError("a timestep condition was given, but this embedding has no cond_proj "
                                 "(set time_cond_proj_dim)")
            sample = sample + self.cond_proj(condition)
        return self.linear_2(self.act(self.linear_1(sample)))


def class_embedding(class_embed_type: str | None, num_class_embeds: int | None, timestep_input_dim: int,
                    time_embed_dim: int, act_fn: str = "silu") -> nn.Module | None:
    """The class-label embedding of a UNet (diffusers' rule), or None for a model without one.

    A table of ``num_class_embeds`` vectors when ``class_embed_type`` is None and that is set;
    ``"timestep"``: labels embedded like timesteps, then their own MLP; ``"identity"``: labels
    are already (B, time_embed_dim) embeddings.
    """
    if class_embed_type is None and num_class_embeds is not None:
        return nn.Embedding(num_class_embeds, time_embed_dim)
    if class_embed_type == "timestep":
        return TimestepEmbedding(timestep_input_dim, time_embed_dim, act_fn=act_fn)
    if class_embed_type == "identity":
        return nn.Identity()
    return None


def embed_timesteps(time_proj: Timesteps, mlp: TimestepEmbedding, timesteps: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """``mlp(time_proj(timesteps).to(dtype))``: (N,) -> (N, time_embed_dim), as a UNet embeds t.

    Runs :func:`fusediff.kernels.timestep_mlp` (one or two kernel launches instead of a dozen ops)
    when the MLP's activation is SiLU, its weights have ``dtype`` and the fused kernels run for
    these tensors now; otherwise, the reference backend included, the modules themselves.
    """
    lin1, lin2 = mlp.linear_1, mlp.linear_2
    if (isinstance(mlp.act, nn.SiLU) and lin1.weight.dtype == dtype
            and kernels.timestep_mlp_runs_fused(timesteps, lin1.weight, lin1.bias, lin2.weight, lin2.bias)):
        return kernels.timestep_mlp(timesteps, time_proj.num_channels, time_proj.flip_sin_to_cos,
                                    time_proj.downscale_freq_shift, time_proj.scale, 10000,
                                    lin1.weight, lin1.bias, lin2.weight, lin2.bias)
    return mlp(time_proj(timesteps).to(dtype=dtype))


class AttentionPooling(nn.Module):
    """Multi-head attention pooling (B, L, C) -> (B, C): the query is mean(tokens) + a learned position.

    Args:
        num_heads: heads; must divide ``embed_dim``.
        embed_dim: C, the token width.
    """

    def __init__(self, num_heads: int, embed_dim: int) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"AttentionPooling: {num_heads} heads must divide the token width {embed_dim} "
                             "(addition_embed_type_num_heads must divide the text embedding width)")
        # created in diffusers' order (position, then k, q, v), so a seeded initialisation matches it
        self.positional_embedding = nn.Parameter(torch.randn(1, embed_dim) / embed_dim**0.5)  # (1, C)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, C)
        batch, _, width = x.shape
        query_token = x.mean(dim=1, keepdim=True) + self.positional_embedding.to(x.dtype)  # (B, 1, C)
        tokens = torch.cat([query_token, x], dim=1)  # (B, L + 1, C)
        q = split_heads(self.q_proj(query_token), self.num_heads)  # (B, heads, 1, D)
        k = split_heads(self.k_proj(tokens), self.num_heads)  # (B, heads, L + 1, D)
        v = split_heads(self.v_proj(tokens), self.num_heads)
        pooled = kernels.attention(q, k, v)  # softmax(q k^T / sqrt(D)) v, in float32: (B, heads, 1, D)
        return pooled.reshape(batch, width)  # heads merged: (B, C)


class TextTimeEmbedding(nn.Module):
    """Text tokens (B, L, encoder_dim) -> (B, time_embed_dim): ``norm2(proj(pool(norm1(tokens))))``.

    Args:
        encoder_dim: width of the text tokens.
        time_embed_dim: width of the UNet's time embedding, which the result is added to.
        num_heads: heads of the attention pooling; must divide ``encoder_dim``.
    """

    def __init__(self, encoder_dim: int, time_embed_dim: int, num_heads: int = 64) -> None:
        super().__init__()
        self.encoder_dim = encoder_dim
        self.norm1 = nn.LayerNorm(encoder_dim)
        self.pool = AttentionPooling(num_heads, encoder_dim)
        self.proj = nn.Linear(encoder_dim, time_embed_dim)
        self.norm2 = nn.LayerNorm(time_embed_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (B, L, encoder_dim) -> (B, time_embed_dim)
        pooled = self.pool(layer_norm(self.norm1, hidden_states))  # (B, encoder_dim)
        return layer_norm(self.norm2, self.proj(pooled))
