"""Memory layout of the models' activations: each keeps the layout of the input it came from.

A model moved to channels-last (``model.to(memory_format=torch.channels_last)``) and given
channels-last (B, C, H, W) inputs runs channels-last end to end: convolutions, interpolation,
padding, pooling, ``torch.cat`` and elementwise ops keep the layout of their (first) input, the
fused GroupNorm(+SiLU) reads and writes NHWC where it lies, and the spatial attentions and
transformers see (B, H*W, C) as a view of an NHWC map. A contiguous model and input stay
contiguous (NCHW). Where a model leaves a (B, H, W, C) view and must hand back a (B, C, H, W)
map, it asks :func:`memory_format_of` its input which layout to materialise, so that no step
converts between the two (a conversion is a full read and write of the activation, and a
mismatch between a convolution's input and weight layouts costs one inside the convolution).
"""

from __future__ import annotations

import torch


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a 4-D x that is channels-last and not also contiguous, else
    ``torch.contiguous_format``: the layout a (B, C, H, W) result derived from x should have."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
