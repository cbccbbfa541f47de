"""The start noise of a run, drawn as diffusers' pipelines draw it (DESIGN.md, decision 5).

One generator draws the whole batch; a list of generators draws sample i from generator i; a
CPU generator draws on the CPU and the noise goes to the device through pinned memory
(:func:`fusediff.utils.torch_utils.randn_tensor`), so a seed gives the same noise on every device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..utils.torch_utils import Generator, randn_tensor


def check_generators(generator: Generator, batch_size: int) -> None:
    """ValueError unless ``generator`` is None, one generator, or a list of one per sample."""
    if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
        raise ValueError(f"got {len(generator)} generators for {batch_size} images; pass one per image")


def initial_noise(shape: Sequence[int], generator: Generator, device: torch.device | str,
                  dtype: torch.dtype | None, latents: torch.Tensor | None = None) -> torch.Tensor:
    """Unit-variance noise of ``shape`` on ``device``: ``latents`` if given (checked to have ``shape``),
    else N(0, I) drawn in ``dtype`` with ``generator``."""
    shape = tuple(int(s) for s in shape)
    check_generators(generator, shape[0])
    if latents is None:
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    if tuple(latents.shape) != shape:
        raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {shape}")
    return latents.to(device)
