"""Activation functions by name, as model configs spell them (``act_fn="silu"``).

The names are those diffusers' configs use: ``silu`` and its older name ``swish`` (SiLU,
Elfwing et al. 2018, arXiv:1702.03118; Ramachandran et al. 2017, arXiv:1710.05941), ``mish``
(Misra 2019, arXiv:1908.08681), ``gelu`` (Hendrycks & Gimpel 2016, arXiv:1606.08415) and
``relu``. Matching is case-insensitive. SiLU is the one fusediff fuses into GroupNorm
(:class:`fusediff.models.normalization.GroupNorm`); the others run as plain torch modules.
"""

from __future__ import annotations

import torch
from torch import nn

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "mish": nn.Mish,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
}


def check_activation(name: str, what: str = "act_fn") -> str:
    """Return ``name`` lower-cased, or raise ValueError naming ``what`` if it is not known."""
    if not isinstance(name, str) or name.lower() not in _ACTIVATIONS:
        raise ValueError(f"{what} must be one of {', '.join(sorted(_ACTIVATIONS))}; got {name!r}")
    return name.lower()


def is_silu(name: str) -> bool:
    """Whether the activation ``name`` is SiLU, which GroupNorm can apply in the same op."""
    return check_activation(name) in ("silu", "swish")


def get_activation(name: str) -> nn.Module:
    """A fresh module computing the activation ``name`` (``silu``, ``swish``, ``mish``, ``gelu``, ``relu``)."""
    return _ACTIVATIONS[check_activation(name)]()


def dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, or x itself where the module is the identity (eval mode, or p = 0), without the module
    call: the models call this per block, and an eager step pays each module call on the host."""
    return module(x) if module.training and module.p > 0 else x
