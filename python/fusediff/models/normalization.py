"""GroupNorm as a module that runs the fused kernel, optionally with the SiLU that follows it.

Group Normalization (Wu & He 2018, arXiv:1803.08494) normalises each sample over groups of
channels; diffusion UNets (DDPM, Ho et al. 2020, Appendix B) follow almost every GroupNorm with
a SiLU, so :class:`GroupNorm` takes ``activation="silu"`` and does both in one call of
:func:`fusediff.kernels.group_norm`. It subclasses :class:`torch.nn.GroupNorm`, so it keeps
that module's ``weight``/``bias`` parameters and state-dict names and loads the same
checkpoints. Without an activation it computes what ``torch.nn.GroupNorm`` does.
:func:`layer_norm` runs a ``torch.nn.LayerNorm``'s parameters through the fused LayerNorm op.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor, residual: torch.Tensor | None = None):
    """``norm(x)``, or with ``residual`` (norm(x + residual), x + residual), by :func:`fusediff.kernels.layer_norm`."""
    return kernels.layer_norm(x, norm.weight, norm.bias, norm.eps, residual=residual)


class GroupNorm(nn.GroupNorm):
    """``torch.nn.GroupNorm`` over (B, C, *) through :func:`fusediff.kernels.group_norm`, with an optional fused SiLU.

    Args:
        num_groups: G, a positive divisor of ``num_channels``.
        num_channels: C, the input's channel count.
        eps: added to the variance before the square root.
        affine: whether to learn a per-channel ``weight`` and ``bias``.
        activation: None, or ``"silu"`` to return silu(groupnorm(x)).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 activation: str | None = None, device=None, dtype=None) -> None:
        if activation not in (None, "silu"):
            raise ValueError(f"GroupNorm: activation must be None or 'silu'; got {activation!r}")
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
            raise ValueError(f"GroupNorm: num_groups must be a positive int; got {num_groups!r}")
        if num_channels % num_groups != 0:
            raise ValueError(f"GroupNorm: num_channels={num_channels} is not divisible by num_groups={num_groups}")
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:  # (B, C, *) -> (B, C, *)
        """The norm of x, or with ``add`` (B, C) of x + add[:, :, None, ...] (one fused op; see group_norm)."""
        return kernels.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, activation=self.activation,
                                  add=add)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")
