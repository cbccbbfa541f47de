"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper of a loop's ``predict``.

    out = predict([x; x], t, **cond)                 one batched call; cond holds both halves
    eps_u, eps_c = out.chunk(2)                      unconditional half first, or second
    eps = eps_u + w (eps_c - eps_u)                  eq. 6 of the paper, with w = 1 + their w
    eps = phi * eps * std(eps_c) / std(eps) + (1 - phi) * eps    guidance rescale (Lin et al. 2024, eq. 15-16)

The caller builds the conditions of both halves (Stable Diffusion: [negative; positive] prompt
embeddings; a class-conditional model: [labels; null labels]) and says which half comes first.
Every value that changes between steps or calls (x, t, the conditions, the scale) is an argument
of :func:`guided_prediction`, so one CUDA graph of it replays with new prompts and scales.

The scale given as a 0-d float32 tensor (what the loop passes, :func:`scale_tensor`) guides a
half-precision prediction in float32 and rounds once; a Python float is applied in the
prediction's dtype, as diffusers applies it. Both give the same numbers on float32 predictions.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance of a run.

    Args:
        scale: w in eps_u + w (eps_c - eps_u); 1 gives the conditional prediction (at twice the cost).
        rescale: phi of guidance rescale (Lin et al. 2024, eq. 16; 0.7 in the paper), 0 for none.
        uncond_first: whether the unconditional half comes first in the batch (Stable Diffusion's
            order) or second (the class-conditional pipeline's).
    """

    scale: float
    rescale: float = 0.0
    uncond_first: bool = True

    def __post_init__(self) -> None:
        for name in ("scale", "rescale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"guidance {name} must be a finite number; got {value!r}")

    def arguments(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, float, bool]:
        """The (scale tensor, rescale, uncond_first) that :func:`guided_prediction` takes."""
        return scale_tensor(self.scale, dtype, device), float(self.rescale), bool(self.uncond_first)


def scale_tensor(guidance_scale: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``guidance_scale`` as a 0-d tensor on ``device``: float32, or ``dtype`` if wider."""
    return torch.full((), guidance_scale, dtype=torch.promote_types(dtype, torch.float32), device=device)


def combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """eps_u + scale (eps_c - eps_u); with a tensor scale of another dtype, computed in its dtype and rounded once."""
    if isinstance(scale, torch.Tensor) and scale.dtype != cond.dtype:
        guided = uncond.to(scale.dtype) + scale * (cond - uncond).to(scale.dtype)
        return guided.to(cond.dtype)
    return uncond + scale * (cond - uncond)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Match the guided prediction's std to the conditional one's, then mix (Lin et al. 2024, eq. 15-16)."""
    dims = list(range(1, cond.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * guided


def guided_prediction(predict: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor,
                      guidance: tuple[torch.Tensor | float, float, bool], **cond: Any) -> torch.Tensor:
    """One call of ``predict`` on [x; x] with ``cond`` (both halves already in it), combined by ``guidance``
    = (scale, rescale, uncond_first) as :meth:`Guidance.arguments` gives it."""
    scale, rescale, uncond_first = guidance
    first, second = predict(torch.cat([x, x]), t, **cond).chunk(2)
    uncond, conditional = (first, second) if uncond_first else (second, first)
    guided = combine(uncond, conditional, scale)
    if rescale > 0:
        guided = rescale_guidance(guided, conditional, rescale)
    return guided
