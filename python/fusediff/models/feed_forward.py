"""The position-wise feed-forward network of a transformer block, with diffusers' activation names.

    FF(x) = W_2 act(x W_1) + b_2                                   (B, S, C) -> (B, S, C_out)

The two-layer MLP of the Transformer (Vaswani et al. 2017, arXiv:1706.03762, Sec. 3.3), as the
transformer blocks of latent diffusion (Rombach et al. 2022, arXiv:2112.10752; its released
code) use it: there the activation is GEGLU, a GELU-gated linear unit (Shazeer 2020,
arXiv:2002.05202) whose first projection is twice as wide and whose gate is its second half:

    GEGLU(x) = (x W + b)[:, :inner] * GELU((x W + b)[:, inner:])

``activation_fn`` takes diffusers' names: ``"geglu"``, ``"geglu-approximate"`` (x W * sigmoid(1.702
x W), the sigmoid approximation of GELU in Hendrycks & Gimpel 2016, arXiv:1606.08415, Sec. 2),
``"gelu"`` and ``"gelu-approximate"`` (tanh approximation). The module tree is diffusers'
(``net.0.proj``, ``net.1`` dropout, ``net.2``), so checkpoints load in both. GEGLU's gating runs
:func:`fusediff.kernels.geglu` (one fused kernel on CUDA that reads the projection once, in
float32 with one rounding); the other activations are plain torch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .activations import dropout

FEED_FORWARD_ACTIVATIONS = ("geglu", "geglu-approximate", "gelu", "gelu-approximate")


class GELU(nn.Module):
    """``gelu(x W + b)``: (..., dim_in) -> (..., dim_out); ``approximate="tanh"`` for the tanh form."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none", bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class GEGLU(nn.Module):
    """GELU-gated linear unit: one projection to 2 dim_out, the first half times GELU of the second.

    ``approximate`` ("none", diffusers' exact erf GELU, or "tanh") picks the GELU; it is not a weight
    or config entry, so checkpoints are diffusers' (``proj.weight``, ``proj.bias``).
    """

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True, approximate: str = "none") -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out, bias=bias)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim_in) -> (..., dim_out)
        return kernels.geglu(self.proj(x), approximate=self.approximate)  # value * gelu(gate), fused


class ApproximateGELU(nn.Module):
    """``h * sigmoid(1.702 h)`` with h = x W + b: the sigmoid approximation of GELU."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return h * torch.sigmoid(1.702 * h)


def _projection(activation_fn: str, dim: int, inner_dim: int, bias: bool) -> nn.Module:
    if activation_fn == "geglu":
        return GEGLU(dim, inner_dim, bias=bias)
    if activation_fn == "geglu-approximate":
        return ApproximateGELU(dim, inner_dim, bias=bias)
    if activation_fn in ("gelu", "gelu-approximate"):
        return GELU(dim, inner_dim, approximate="tanh" if activation_fn == "gelu-approximate" else "none", bias=bias)
    raise ValueError(f"activation_fn must be one of {', '.join(FEED_FORWARD_ACTIVATIONS)}; got {activation_fn!r}")


class FeedForward(nn.Module):
    """Projection with activation, dropout, projection back: (B, S, dim) -> (B, S, dim_out).

    Args:
        dim: input width.
        dim_out: output width; ``dim`` when None.
        mult: inner width is ``mult * dim`` unless ``inner_dim`` is given.
        dropout: dropout probability after the activation (and at the end with ``final_dropout``).
        activation_fn: one of :data:`FEED_FORWARD_ACTIVATIONS`.
        final_dropout: append a second dropout after the output projection.
        inner_dim: the hidden width.
        bias: whether both projections have a bias.
    """

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, dropout: float = 0.0,
                 activation_fn: str = "geglu", final_dropout: bool = False, inner_dim: int | None = None,
                 bias: bool = True) -> None:
        super().__init__()
        inner_dim = int(dim * mult) if inner_dim is None else inner_dim
        dim_out = dim if dim_out is None else dim_out
        layers = [_projection(activation_fn, dim, inner_dim, bias), nn.Dropout(dropout),
                  nn.Linear(inner_dim, dim_out, bias=bias)]
        if final_dropout:
            layers.append(nn.Dropout(dropout))
        self.net = nn.ModuleList(layers)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            hidden_states = dropout(layer, hidden_states) if isinstance(layer, nn.Dropout) else layer(hidden_states)
        return hidden_states
