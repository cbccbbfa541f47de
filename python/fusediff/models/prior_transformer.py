"""PriorTransformer: unCLIP's diffusion prior, a causal transformer that denoises a CLIP image embedding.

    tokens = [W_enc c_1..c_L,  W_proj y,  MLP(embed(t)),  W_in z_t,  prd]     (B, L + 4, inner)
    h      = tokens + positional embedding                                  zero-padded when shorter
    h      = blocks(LayerNorm_in(h), mask)                                   pre-norm self-attention blocks
    z_0    = W_out LayerNorm_out(h)[:, -1]                                   the prd token's output (B, D)

The decoder-only prior of DALL-E 2 (Ramesh et al. 2022, arXiv:2204.06125, Sec. 2.2): the text
encoder's token states c, the CLIP text embedding y, the timestep and the noisy image embedding z_t
are a sequence whose final learned "prd" token predicts the clean embedding (prediction_type
"sample"). With ``attention_mask`` (the text padding, B x L) each row attends causally: diffusers'
bias (1 - m) * -10000 on the text keys plus a -10000 upper triangle. :meth:`post_process_latents`
undoes the CLIP-embedding normalisation, z * clip_std + clip_mean.

Same constructor arguments, defaults, parameter names and ``config.json`` as diffusers 0.42.1's
``PriorTransformer``, so checkpoints load in either library. The time embedding runs
:func:`fusediff.kernels.timestep_mlp` (or the sinusoid and the MLP) and the LayerNorms
:func:`fusediff.kernels.layer_norm`; unmasked attention runs :func:`fusediff.kernels.attention`,
masked attention PyTorch's SDPA (:mod:`fusediff.models.attention_mask`).

Kept from diffusers on purpose: the causal mask is applied only when ``attention_mask`` is given
(without one every token attends to every other). Differences, where diffusers fails obscurely or
not at all: inputs of the wrong shape, a mask whose length plus ``additional_embeddings`` is not
the sequence length, and ``encoder_hidden_states`` missing while the model projects them raise
ValueError naming the argument. LoRA/PEFT loading and attention-processor switching are not
implemented.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..configuration import register_to_config
from ..modeling import ModelMixin
from ..utils.outputs import BaseOutput
from .activations import check_activation
from .attention_mask import MASKED_BIAS, mask_bias
from .embeddings import TimestepEmbedding, Timesteps, embed_timesteps
from .normalization import layer_norm
from .transformer_2d import BasicTransformerBlock
from .unet_2d_checks import timesteps_for_batch

NORM_TYPES = (None, "layer")


@dataclasses.dataclass
class PriorTransformerOutput(BaseOutput):
    """Output of :class:`PriorTransformer`: the predicted (clean) image embedding, (B, clip_embed_dim)."""

    predicted_image_embedding: torch.Tensor


def _choice(name: str, value: str | None, allowed: tuple[str | None, ...]) -> str | None:
    if value not in allowed:
        raise ValueError(f"PriorTransformer: {name} must be one of {allowed}; got {value!r}")
    return value


class PriorTransformer(ModelMixin):
    """The unCLIP prior: (B, D) noisy CLIP image embeddings + text conditions -> (B, D) predictions.

    Args (diffusers' names and defaults):
        num_attention_heads, attention_head_dim: heads and the width of each (inner = their product).
        num_layers: transformer blocks.
        embedding_dim: D of the image embedding x_t and of the text encoder's hidden states.
        num_embeddings: L, the text tokens the positional embedding covers.
        additional_embeddings: tokens after the text (projected embedding, time, x_t, prd): 4.
        dropout: dropout inside the blocks.
        time_embed_act_fn: activation of the time MLP.
        norm_in_type, embedding_proj_norm_type: None or "layer" (a LayerNorm on the sequence / on
            the projected embedding's input).
        encoder_hid_proj_type: "linear" (project the text states) or None (the model takes none).
        added_emb_type: "prd" (a learned final token, whose output is the prediction) or None.
        time_embed_dim: the time MLP's hidden width (inner by default).
        embedding_proj_dim: the width of ``proj_embedding`` (D by default).
        clip_embed_dim: the output width (D by default).
    """

    @register_to_config
    def __init__(self, num_attention_heads: int = 32, attention_head_dim: int = 64, num_layers: int = 20,
                 embedding_dim: int = 768, num_embeddings: int = 77, additional_embeddings: int = 4,
                 dropout: float = 0.0, time_embed_act_fn: str = "silu", norm_in_type: str | None = None,
                 embedding_proj_norm_type: str | None = None, encoder_hid_proj_type: str | None = "linear",
                 added_emb_type: str | None = "prd", time_embed_dim: int | None = None,
                 embedding_proj_dim: int | None = None, clip_embed_dim: int | None = None) -> None:
        super().__init__()
        check_activation(time_embed_act_fn, "time_embed_act_fn")
        _choice("norm_in_type", norm_in_type, NORM_TYPES)
        _choice("embedding_proj_norm_type", embedding_proj_norm_type, NORM_TYPES)
        _choice("encoder_hid_proj_type", encoder_hid_proj_type, (None, "linear"))
        _choice("added_emb_type", added_emb_type, (None, "prd"))
        inner = num_attention_heads * attention_head_dim
        time_embed_dim = time_embed_dim or inner
        embedding_proj_dim = embedding_proj_dim or embedding_dim
        clip_embed_dim = clip_embed_dim or embedding_dim
        self.num_attention_heads, self.attention_head_dim = num_attention_heads, attention_head_dim
        self.additional_embeddings = additional_embeddings
        # created in diffusers' order, so a seeded initialisation gives the same weights
        self.time_proj = Timesteps(inner, True, 0)
        self.time_embedding = TimestepEmbedding(inner, time_embed_dim, act_fn=time_embed_act_fn, out_dim=inner)
        self.proj_in = nn.Linear(embedding_dim, inner)
        self.embedding_proj_norm = nn.LayerNorm(embedding_proj_dim) if embedding_proj_norm_type else None
        self.embedding_proj = nn.Linear(embedding_proj_dim, inner)
        self.encoder_hidden_states_proj = nn.Linear(embedding_dim, inner) if encoder_hid_proj_type else None
        self.positional_embedding = nn.Parameter(torch.zeros(1, num_embeddings + additional_embeddings, inner))
        self.prd_embedding = nn.Parameter(torch.zeros(1, 1, inner)) if added_emb_type else None
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, num_attention_heads, attention_head_dim, dropout=dropout,
                                  activation_fn="gelu", attention_bias=True) for _ in range(num_layers)])
        self.norm_in = nn.LayerNorm(inner) if norm_in_type else None
        self.norm_out = nn.LayerNorm(inner)
        self.proj_to_clip_embeddings = nn.Linear(inner, clip_embed_dim)
        size = num_embeddings + additional_embeddings
        causal = torch.full((size, size), MASKED_BIAS).triu_(1)[None]  # (1, S, S): -10000 above the diagonal
        self.register_buffer("causal_attention_mask", causal, persistent=False)
        self.clip_mean = nn.Parameter(torch.zeros(1, clip_embed_dim))
        self.clip_std = nn.Parameter(torch.zeros(1, clip_embed_dim))

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor | float | int,
                proj_embedding: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                return_dict: bool = True) -> PriorTransformerOutput | tuple[torch.Tensor]:
        """Predict from ``hidden_states`` (B, D), the noisy image embedding, at ``timestep``.

        ``proj_embedding`` (B, embedding_proj_dim) is the CLIP text embedding; ``encoder_hidden_states``
        (B, L, D) the text encoder's token states; ``attention_mask`` (B, L), 1 = a real token, turns on
        the causal, padding-aware mask. Returns :class:`PriorTransformerOutput` or
        ``(predicted_image_embedding,)``.
        """
        self._check_inputs(hidden_states, proj_embedding, encoder_hidden_states)
        batch = hidden_states.shape[0]
        timesteps = timesteps_for_batch(timestep, batch, hidden_states.device, "timestep")  # (B,)
        time_embeddings = embed_timesteps(self.time_proj, self.time_embedding, timesteps, self.dtype)  # (B, inner)

        if self.embedding_proj_norm is not None:
            proj_embedding = layer_norm(self.embedding_proj_norm, proj_embedding)
        proj_embeddings = self.embedding_proj(proj_embedding)  # (B, inner)
        hidden_states = self.proj_in(hidden_states)  # (B, inner)

        # 1. the sequence: [text states], projected embedding, time, x_t, [prd]
        tokens = []
        if encoder_hidden_states is not None and self.encoder_hidden_states_proj is not None:
            tokens.append(self.encoder_hidden_states_proj(encoder_hidden_states))  # (B, L, inner)
        elif encoder_hidden_states is not None:
            tokens.append(encoder_hidden_states)
        before_x = sum(t.shape[1] for t in tokens) + 2  # tokens ahead of the ones the embedding may not cover
        tokens += [proj_embeddings[:, None], time_embeddings[:, None], hidden_states[:, None]]
        if self.prd_embedding is not None:
            tokens.append(self.prd_embedding.to(hidden_states.dtype).expand(batch, -1, -1))
        h = torch.cat(tokens, dim=1)  # (B, S, inner)

        # 2. positional embedding, zero-padded (diffusers' rule) when it covers fewer tokens
        positions = self.positional_embedding.to(h.dtype)
        if positions.shape[1] < h.shape[1]:
            trailing = self.prd_embedding.shape[1] if self.prd_embedding is not None else 0
            positions = F.pad(positions, (0, 0, before_x, trailing), value=0.0)
        if positions.shape[1] != h.shape[1]:
            raise ValueError(f"PriorTransformer: the sequence has {h.shape[1]} tokens but the positional embedding "
                             f"{positions.shape[1]}; encoder_hidden_states must have num_embeddings = "
                             f"{self.config.num_embeddings} tokens")
        h = h + positions

        # 3. the causal, padding-aware mask: (B, 1, S, S), broadcast over the heads
        bias = None if attention_mask is None else self._attention_bias(attention_mask, h)
        if self.norm_in is not None:
            h = layer_norm(self.norm_in, h)
        for block in self.transformer_blocks:
            h = block(h, attention_mask=bias)
        h = layer_norm(self.norm_out, h)

        # 4. the prediction: the prd token's output (or every token after the conditions)
        h = h[:, -1] if self.prd_embedding is not None else h[:, before_x:]
        out = self.proj_to_clip_embeddings(h)
        if not return_dict:
            return (out,)
        return PriorTransformerOutput(predicted_image_embedding=out)

    def post_process_latents(self, prior_latents: torch.Tensor) -> torch.Tensor:
        """The image embedding of normalised latents: z * clip_std + clip_mean."""
        device = prior_latents.device
        return prior_latents * self.clip_std.to(device) + self.clip_mean.to(device)

    def _attention_bias(self, attention_mask: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """diffusers' bias: the text mask padded with ``additional_embeddings`` keys, plus the causal triangle."""
        batch, seq = h.shape[:2]
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 \
                or attention_mask.shape[0] != batch or attention_mask.shape[1] + self.additional_embeddings != seq:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"PriorTransformer: attention_mask must be a ({batch}, "
                             f"{seq - self.additional_embeddings}) mask of the text tokens; got {got}")
        bias = F.pad(mask_bias(attention_mask, h.dtype), (0, self.additional_embeddings), value=0.0)  # (B, S)
        if self.causal_attention_mask.shape[-1] != seq:
            raise ValueError(f"PriorTransformer: an attention mask needs num_embeddings + additional_embeddings = "
                             f"{self.causal_attention_mask.shape[-1]} tokens; the sequence has {seq}")
        return (bias[:, None, :] + self.causal_attention_mask).to(h.dtype)[:, None]  # (B, 1, S, S)

    def _check_inputs(self, hidden_states: torch.Tensor, proj_embedding: torch.Tensor,
                      encoder_hidden_states: torch.Tensor | None) -> None:
        """ValueError naming the argument unless the inputs have the shapes this model takes."""
        cfg = self.config

        def check(name: str, value: object, shape: tuple) -> None:
            ok = isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() == len(shape) \
                and all(want is None or got == want for got, want in zip(value.shape, shape))
            if not ok:
                got = (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else type(value).__name__
                want = tuple("*" if s is None else s for s in shape)
                raise ValueError(f"PriorTransformer: {name} must be a floating-point tensor of shape {want}; got {got}")

        check("hidden_states", hidden_states, (None, cfg.embedding_dim))
        batch = hidden_states.shape[0]
        check("proj_embedding", proj_embedding, (batch, cfg.embedding_proj_dim or cfg.embedding_dim))
        if encoder_hidden_states is None:
            if self.encoder_hidden_states_proj is not None:
                raise ValueError("PriorTransformer: encoder_hidden_states is required (encoder_hid_proj_type is set)")
            return
        check("encoder_hidden_states", encoder_hidden_states, (batch, None, cfg.embedding_dim))
