"""UnCLIPTextProjModel: how unCLIP's decoder is conditioned on a CLIP image embedding and the text.

    e_img = [null; e_img]                          with guidance: a learned "no image" embedding first
    temb  = W_t y + W_i e_img                      added to the decoder's time embedding (B, time_embed_dim)
    ctx   = [reshape(W_c e_img) as 4 tokens; LayerNorm(W_h c)]   the decoder's context (B, 4 + L, C_ctx)

DALL-E 2's decoder (Ramesh et al. 2022, arXiv:2204.06125, Sec. 2.1): GLIDE's UNet with the CLIP
image embedding projected and added to the timestep embedding, and projected into four extra
context tokens ahead of the text encoder's outputs; y is the CLIP text embedding, c the text
encoder's token states. Under classifier-free guidance the unconditional half's image embedding is
the learned ``learned_classifier_free_guidance_embeddings``.

Same constructor arguments (keyword-only, as in diffusers), ``config.json`` and parameter names as
diffusers 0.42.1's ``UnCLIPTextProjModel`` (``model_index.json`` names it
``["diffusers", "UnCLIPTextProjModel"]``, as diffusers writes it). The LayerNorm runs :func:`fusediff.kernels.layer_norm`. Difference: mismatched batch sizes
raise ValueError (diffusers asserts).
"""

from __future__ import annotations

import torch
from torch import nn

from ..configuration import register_to_config
from ..modeling import ModelMixin
from .normalization import layer_norm


class UnCLIPTextProjModel(ModelMixin):
    """Projects CLIP image/text embeddings into the unCLIP decoder's context tokens and time embedding.

    Args:
        clip_extra_context_tokens: the image embedding's context tokens (4).
        clip_embeddings_dim: width of the CLIP embeddings and of the text encoder's states.
        time_embed_dim: the decoder's time-embedding width.
        cross_attention_dim: the decoder's context width.
    """

    @register_to_config
    def __init__(self, *, clip_extra_context_tokens: int = 4, clip_embeddings_dim: int = 768, time_embed_dim: int,
                 cross_attention_dim: int) -> None:
        super().__init__()
        self.learned_classifier_free_guidance_embeddings = nn.Parameter(torch.zeros(clip_embeddings_dim))
        self.embedding_proj = nn.Linear(clip_embeddings_dim, time_embed_dim)
        self.clip_image_embeddings_project_to_time_embeddings = nn.Linear(clip_embeddings_dim, time_embed_dim)
        self.clip_extra_context_tokens = clip_extra_context_tokens
        self.clip_extra_context_tokens_proj = nn.Linear(clip_embeddings_dim,
                                                        clip_extra_context_tokens * cross_attention_dim)
        self.encoder_hidden_states_proj = nn.Linear(clip_embeddings_dim, cross_attention_dim)
        self.text_encoder_hidden_states_norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, *, image_embeddings: torch.Tensor, prompt_embeds: torch.Tensor,
                text_encoder_hidden_states: torch.Tensor,
                do_classifier_free_guidance: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, tokens + L, cross_attention_dim), additive time embedding (B, time_embed_dim)).

        ``image_embeddings`` (B', D) are the conditional image embeddings: with guidance B = 2 B' and the
        learned null embedding is put first; ``prompt_embeds`` (B, D) and ``text_encoder_hidden_states``
        (B, L, D) already hold both halves.
        """
        for name, value, dims in (("image_embeddings", image_embeddings, 2), ("prompt_embeds", prompt_embeds, 2),
                                  ("text_encoder_hidden_states", text_encoder_hidden_states, 3)):
            if not isinstance(value, torch.Tensor) or value.dim() != dims:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"UnCLIPTextProjModel: {name} must be a {dims}-d tensor; got {got}")
        if do_classifier_free_guidance:
            null = self.learned_classifier_free_guidance_embeddings.unsqueeze(0).expand(image_embeddings.shape[0], -1)
            image_embeddings = torch.cat([null, image_embeddings], dim=0)
        batch = prompt_embeds.shape[0]
        if image_embeddings.shape[0] != batch or text_encoder_hidden_states.shape[0] != batch:
            raise ValueError(f"UnCLIPTextProjModel: {image_embeddings.shape[0]} image embeddings (after guidance), "
                             f"{batch} prompt embeddings and {text_encoder_hidden_states.shape[0]} text states must "
                             "be as many")
        # the time embedding's addition: projected text and image embeddings
        time_embeddings = self.clip_image_embeddings_project_to_time_embeddings(image_embeddings) \
            + self.embedding_proj(prompt_embeds)  # (B, time_embed_dim)
        # the image embedding as extra context tokens: (B, tokens * C) -> (B, tokens, C)
        extra = self.clip_extra_context_tokens_proj(image_embeddings)
        extra = extra.reshape(batch, -1, self.clip_extra_context_tokens).permute(0, 2, 1)
        text = layer_norm(self.text_encoder_hidden_states_norm,
                          self.encoder_hidden_states_proj(text_encoder_hidden_states))  # (B, L, C)
        return torch.cat([extra, text], dim=1), time_embeddings
