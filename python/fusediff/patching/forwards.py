"""Fused forwards that :func:`fusediff.patch` installs on single modules of other libraries.

A patched module keeps its class, parameters, buffers, hooks and state-dict names; only its
instance gets a ``forward`` attribute, ``functools.partial(fn, module)``, which ``nn.Module.__call__``
finds before the class's method. Removing that attribute restores the class's own forward
exactly. A partial (rather than a bound method) survives ``copy.deepcopy`` and pickling.

Targets here (the attention processor is in ``attention_processor.py``):
- ``torch.nn.GroupNorm`` (exactly that class, from any library): :func:`fusediff.kernels.group_norm`.
- diffusers' ``ResnetBlock2D`` with SiLU: norm1 + SiLU and norm2 + SiLU as one fused op each,
  the rest as diffusers computes it (DDPM's residual block, Ho et al. 2020, Appendix B).
- diffusers' ``Timesteps``: the sinusoid (Vaswani et al. 2017, Sec. 3.5) in one kernel, by
  fusediff's own ``Timesteps.forward`` (the attribute names are diffusers').
- diffusers' ``GEGLU`` (Shazeer 2020): the projection, then h * gelu(gate) in one kernel
  (:func:`fusediff.kernels.geglu`) instead of a GELU and a multiply.

Limits: forward hooks on a ResnetBlock2D's ``norm1``/``norm2``/``nonlinearity`` do not run (the
block calls the kernel directly). Under autocast a fused GroupNorm returns x's dtype where
torch's returns float32. The installed partial refers to its module, a reference cycle (as
accelerate's hooks make): a dropped patched model is freed by the garbage collector.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..models.embeddings import Timesteps as _FusediffTimesteps


@dataclasses.dataclass(frozen=True)
class Target:
    """One kind of module that patch() gives fused computation, and how to install and remove it."""

    kind: str  # the name reports use
    matches: Callable[[nn.Module], bool]  # whether a module is of this kind (its class)
    unsupported: Callable[[nn.Module], str | None]  # why this instance cannot be patched, or None
    install: Callable[[nn.Module], None]
    installed: Callable[[nn.Module], bool]
    remove: Callable[[nn.Module], None]


def is_diffusers(module: nn.Module, class_name: str) -> bool:
    """Whether ``module`` is an instance of diffusers' class ``class_name`` (matched by name, so
    diffusers is never imported here)."""
    cls = type(module)
    return cls.__name__ == class_name and cls.__module__.startswith("diffusers.")


def set_forward(module: nn.Module, fn: Callable) -> None:
    """Give ``module`` the instance forward ``fn(module, ...)``."""
    module.forward = functools.partial(fn, module)


def has_forward(module: nn.Module, fn: Callable) -> bool:
    """Whether ``module``'s instance forward is ``fn`` bound to it by :func:`set_forward`."""
    forward = module.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is fn and forward.args[0] is module


def del_forward(module: nn.Module) -> None:
    """Remove the instance forward, so the class's own runs again."""
    del module.forward


def forward_target(kind: str, matches: Callable[[nn.Module], bool], unsupported: Callable[[nn.Module], str | None],
                   fn: Callable) -> Target:
    """A :class:`Target` whose patch is the instance forward ``fn``."""
    return Target(kind, matches, unsupported, install=lambda m: set_forward(m, fn),
                  installed=lambda m: has_forward(m, fn), remove=del_forward)


def missing(module: nn.Module, types: dict[str, type | tuple[type, ...] | None]) -> str | None:
    """Why ``module`` does not have the shape a fused forward relies on: the first attribute in
    ``types`` that is absent or not of exactly its type (None: any value), or None if all are."""
    for name, kind in types.items():
        if not hasattr(module, name):
            return f"has no attribute {name!r}"
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if kind is not None and type(getattr(module, name)) not in kinds:
            return (f"{name} is a {type(getattr(module, name)).__name__}, not "
                    f"{' or '.join(k.__name__ for k in kinds)}")
    return None


# --- torch.nn.GroupNorm --------------------------------------------------------------------

def group_norm_forward(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:  # (B, C, *) -> (B, C, *)
    return kernels.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


GROUP_NORM = forward_target("GroupNorm", lambda m: type(m) is nn.GroupNorm, lambda m: None, group_norm_forward)


# --- diffusers ResnetBlock2D ---------------------------------------------------------------

_RESNET_ATTRIBUTES = {"norm1": nn.GroupNorm, "norm2": nn.GroupNorm, "nonlinearity": nn.SiLU, "conv1": None,
                      "conv2": None, "dropout": nn.Dropout, "time_emb_proj": None, "conv_shortcut": None,
                      "upsample": None, "downsample": None, "skip_time_act": None, "output_scale_factor": None,
                      "time_embedding_norm": str}


def _resnet_unsupported(block: nn.Module) -> str | None:
    why = missing(block, _RESNET_ATTRIBUTES)
    return None if why is None else why + " (the fused forward fuses SiLU into both GroupNorms)"


def _norm_silu(norm: nn.GroupNorm, h: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """silu(norm(h)), or of h + add[:, :, None, None] with add (B, C): one fused op."""
    if add is not None and add.dtype != h.dtype:  # the sum promotes: add it as torch does
        h, add = h + add[:, :, None, None], None
    return kernels.group_norm(h, norm.num_groups, norm.weight, norm.bias, norm.eps, activation="silu", add=add)


def resnet_forward(block: nn.Module, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args,
                   **kwargs) -> torch.Tensor:
    """diffusers' ResnetBlock2D.forward with each GroupNorm + SiLU as one fused op.

    input_tensor (B, C_in, H, W), temb (B, temb_channels) -> (B, C_out, H', W'); any memory format.
    """
    if args or kwargs:  # the deprecated `scale`: diffusers' forward warns about it and ignores it
        return type(block).forward(block, input_tensor, temb, *args, **kwargs)
    x = input_tensor
    h = _norm_silu(block.norm1, x)  # (B, C_in, H, W)
    if block.upsample is not None:
        if h.shape[0] >= 64:  # as diffusers: the channels-last nearest upsampling fails on large batches
            x, h = x.contiguous(), h.contiguous()
        x, h = block.upsample(x), block.upsample(h)  # (B, C_in, 2H, 2W)
    elif block.downsample is not None:
        x, h = block.downsample(x), block.downsample(h)  # (B, C_in, H/2, W/2)
    h = block.conv1(h)  # (B, C_out, H', W')

    if block.time_emb_proj is not None:
        if not block.skip_time_act:
            temb = F.silu(temb)
        temb = block.time_emb_proj(temb)  # (B, C_out or 2 C_out)
    if block.time_embedding_norm == "scale_shift":  # the modulation comes between the norm and the SiLU
        if temb is None:
            raise ValueError("ResnetBlock2D: `temb` should not be None when time_embedding_norm is 'scale_shift'")
        scale, shift = temb[:, :, None, None].chunk(2, dim=1)  # (B, C_out, 1, 1) each
        norm = block.norm2
        h = kernels.group_norm(h, norm.num_groups, norm.weight, norm.bias, norm.eps)
        h = F.silu(torch.addcmul(shift, h, 1 + scale))  # h * (1 + scale) + shift
    else:  # "default" adds the embedding; diffusers' VAE decoder passes "group" (no embedding)
        add = temb if block.time_embedding_norm == "default" else None
        h = _norm_silu(block.norm2, h, add)  # silu(norm2(h + temb[:, :, None, None])), the add fused

    if block.training:  # nn.Dropout is the identity in eval mode
        h = block.dropout(h)
    h = block.conv2(h)  # (B, C_out, H', W')
    if block.conv_shortcut is not None:
        x = block.conv_shortcut(x.contiguous() if block.training else x)  # as diffusers (DDP's stride warning)
    out = x + h
    return out if block.output_scale_factor == 1 else out.div_(block.output_scale_factor)


RESNET = forward_target("ResnetBlock2D", lambda m: is_diffusers(m, "ResnetBlock2D"), _resnet_unsupported,
                        resnet_forward)


# --- diffusers Timesteps -------------------------------------------------------------------

def _timesteps_unsupported(module: nn.Module) -> str | None:
    why = missing(module, {"num_channels": int, "flip_sin_to_cos": bool, "downscale_freq_shift": (int, float),
                           "scale": (int, float)})
    if why is not None:
        return why
    if module.num_channels < 1:
        return f"num_channels is {module.num_channels}"
    if module.num_channels >= 2 and module.num_channels // 2 == module.downscale_freq_shift:
        return "num_channels // 2 == downscale_freq_shift divides by zero (diffusers returns NaN there)"
    return None


TIMESTEPS = forward_target("Timesteps", lambda m: is_diffusers(m, "Timesteps"), _timesteps_unsupported,
                           _FusediffTimesteps.forward)


# --- diffusers GEGLU -------------------------------------------------------------------------

def geglu_forward(module: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers' GEGLU.forward: (B, S, C_in) -> proj -> (B, S, 2F) -> h * gelu(gate), (B, S, F)."""
    if args or kwargs:  # the deprecated `scale`: diffusers' forward warns about it and ignores it
        return type(module).forward(module, hidden_states, *args, **kwargs)
    return kernels.geglu(module.proj(hidden_states))


GEGLU = forward_target("GEGLU", lambda m: is_diffusers(m, "GEGLU"),
                       lambda m: missing(m, {"proj": nn.Linear}), geglu_forward)
