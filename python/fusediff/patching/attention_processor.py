"""An attention processor for diffusers' ``Attention`` that runs fusediff's kernels.

diffusers' ``Attention`` module delegates its computation to a processor object
(``attn.set_processor(...)``). :class:`FusedAttnProcessor` computes what diffusers' two default
processors, ``AttnProcessor2_0`` (torch SDPA) and ``AttnProcessor`` (baddbmm + softmax), compute
(multi-head attention, Vaswani et al. 2017, arXiv:1706.03762, Sec. 3.2, with diffusers'
optional input GroupNorm, spatial norm, cross-attention norm, residual and output rescaling):

    h   = GroupNorm(x)                        kernels.group_norm, on the 4-D map where it lies
    q   = h W_q, k = c W_k, v = c W_v         (B, heads, S, D) views of the projections, c = h or the context
    o   = softmax(q k^T * scale) v            kernels.attention, any strides
    out = (o W_out [+ x]) / rescale_output_factor

A spatial (B, C, H, W) input is read as a (B, S, C) view, never copied, in NCHW and in
channels-last alike; the output is the same view of the projection, as diffusers returns it.

Rule: patch replaces only those two default processors, on an ``Attention`` without added
key/value projections, grouped-query heads, fused projections or q/k norms. Any other processor
(xformers, sliced, LoRA, IP-Adapter, a user's own) is left in place and reported. The processor
keeps the one it replaced and calls it for what the kernel does not cover: an attention mask,
extra keyword arguments, and head sizes above ``MAX_FUSED_HEAD_DIM`` (256; the kernel would run its
float32 reference there, e.g. the single 512-wide head of SD's VAE, where torch's SDPA is faster).
The scale is what the replaced processor uses: 1/sqrt(D) for SDPA, ``attn.scale`` for
``AttnProcessor``. Softmax and products are always float32, as ``upcast_attention`` asks.

``Attention.forward`` inspects the processor's signature on every call; patch also installs an
instance forward that calls this processor directly (while it is the module's processor and no
mask or other keyword arrives) and otherwise runs diffusers' forward. diffusers'
``set_default_attn_processor`` refuses processor classes it does not know: unpatch first.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..kernels.attention import MAX_FUSED_HEAD_DIM
from .forwards import Target, del_forward, has_forward, is_diffusers, missing, set_forward

# diffusers' default processors -> whether they scale the logits by attn.scale (else 1/sqrt(D))
REPLACED_PROCESSORS = {"AttnProcessor2_0": False, "AttnProcessor": True}


class FusedAttnProcessor:
    """Processor for a diffusers ``Attention`` through :func:`fusediff.kernels.attention` and
    :func:`fusediff.kernels.group_norm`; ``original`` is the processor it replaced."""

    def __init__(self, original) -> None:
        self.original = original
        self.use_attn_scale = REPLACED_PROCESSORS[type(original).__name__]

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args,
                 **kwargs) -> torch.Tensor:
        if attention_mask is not None or args or kwargs:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return self.run(attn, hidden_states, encoder_hidden_states, temb)

    def run(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
            temb: torch.Tensor | None = None) -> torch.Tensor:
        """The attention without a mask: (B, C, H, W) or (B, S, C), context (B, L, C_ctx) -> x's shape."""
        heads = attn.heads
        head_dim = attn.to_q.out_features // heads
        if head_dim > MAX_FUSED_HEAD_DIM:
            return self.original(attn, hidden_states, encoder_hidden_states, None, temb)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        norm = attn.group_norm
        spatial = hidden_states.dim() == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            if norm is not None:
                hidden_states = kernels.group_norm(hidden_states, norm.num_groups, norm.weight, norm.bias, norm.eps)
            h = hidden_states.flatten(2).transpose(1, 2)  # (B, S, C), a view in NCHW and channels-last
        else:
            h = hidden_states  # (B, S, C)
            if norm is not None:
                h = kernels.group_norm(h.transpose(1, 2), norm.num_groups, norm.weight, norm.bias,
                                       norm.eps).transpose(1, 2)
        batch = h.shape[0]
        if encoder_hidden_states is None:
            context = h
        elif attn.norm_cross is not None:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)  # (B, L, C_ctx)
        else:
            context = encoder_hidden_states
        q = attn.to_q(h).view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, heads, S, D)
        k = attn.to_k(context).view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, heads, L, D)
        v = attn.to_v(context).view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, heads, L, D)
        o = kernels.attention(q, k, v, attn.scale if self.use_attn_scale else None)  # (B, heads, S, D)
        o = o.transpose(1, 2).reshape(batch, -1, heads * head_dim)  # (B, S, heads * D)
        out = attn.to_out[0](o)  # (B, S, C)
        if attn.training:  # to_out[1] is a dropout, the identity in eval mode
            out = attn.to_out[1](out)
        if spatial:
            out = out.transpose(1, 2).view(batch, channels, height, width)  # (B, C, H, W), channels-last strides
        if attn.residual_connection:
            out = out + residual
        factor = attn.rescale_output_factor
        return out if factor == 1 else out / factor


def attention_forward(attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, **cross_attention_kwargs) -> torch.Tensor:
    """diffusers' Attention.forward without its per-call signature inspection when the processor is ours."""
    processor = attn.processor
    if type(processor) is FusedAttnProcessor and attention_mask is None and cross_attention_kwargs.keys() <= {"temb"}:
        return processor.run(attn, hidden_states, encoder_hidden_states, cross_attention_kwargs.get("temb"))
    return type(attn).forward(attn, hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs)


_ATTRIBUTES = {"processor": None, "set_processor": None, "heads": int, "scale": (int, float), "to_q": nn.Linear,
               "to_k": nn.Linear, "to_v": nn.Linear, "to_out": nn.ModuleList, "group_norm": (type(None), nn.GroupNorm),
               "spatial_norm": None, "norm_cross": None, "norm_q": type(None), "norm_k": type(None),
               "added_kv_proj_dim": type(None), "residual_connection": bool, "rescale_output_factor": (int, float)}


def _unsupported(attn: nn.Module) -> str | None:
    why = missing(attn, _ATTRIBUTES)
    if why is not None:
        return why
    processor = type(attn.processor)
    if processor.__name__ not in REPLACED_PROCESSORS or not processor.__module__.startswith("diffusers."):
        return (f"its processor {processor.__module__}.{processor.__name__} is not one of diffusers' defaults "
                f"({', '.join(REPLACED_PROCESSORS)}); left in place")
    if getattr(attn, "fused_projections", False):
        return "its q/k/v projections are fused"
    inner = attn.to_q.out_features
    if inner % attn.heads or attn.to_k.out_features != inner or attn.to_v.out_features != inner:
        return (f"q, k, v widths {inner}, {attn.to_k.out_features}, {attn.to_v.out_features} are not "
                f"{attn.heads} heads of one size")
    if len(attn.to_out) != 2 or type(attn.to_out[1]) is not nn.Dropout:
        return "to_out is not [Linear, Dropout]"
    return None


def _install(attn: nn.Module) -> None:
    attn.set_processor(FusedAttnProcessor(attn.processor))
    set_forward(attn, attention_forward)


def _installed(attn: nn.Module) -> bool:
    return has_forward(attn, attention_forward) or type(getattr(attn, "processor", None)) is FusedAttnProcessor


def _remove(attn: nn.Module) -> None:
    """Put the replaced processor back (unless another has replaced ours since) and remove the forward."""
    if type(attn.processor) is FusedAttnProcessor:
        attn.set_processor(attn.processor.original)
    if has_forward(attn, attention_forward):
        del_forward(attn)


ATTENTION = Target("Attention", lambda m: is_diffusers(m, "Attention"), _unsupported, _install, _installed, _remove)
