"""Seeded Gaussian noise drawn exactly as diffusers draws it (DESIGN.md, decision 5).

Same seed, same image: a pipeline or scheduler that draws its noise here gets the numbers
diffusers' ``randn_tensor`` would, because the generator, device, shape and order of the
draws are the same. A CPU generator used for a CUDA tensor draws on the CPU and copies, as
diffusers does, so a seeded CPU generator gives the same noise whatever the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generator = torch.Generator | Sequence[torch.Generator] | None


def randn_tensor(shape: Sequence[int], generator: Generator = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``device``.

    ``generator`` may be one generator, or a list with one per batch element (``shape[0]``),
    in which case element i is drawn from ``generator[i]`` alone and the results are stacked.
    """
    shape = tuple(int(s) for s in shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    gens = list(generator) if isinstance(generator, (list, tuple)) else generator
    if isinstance(gens, list) and len(gens) == 1:
        gens = gens[0]
    draw_device = device
    if gens is not None:
        gen_type = (gens[0] if isinstance(gens, list) else gens).device.type
        if gen_type != device.type:
            if gen_type != "cpu":
                raise ValueError(f"cannot draw a {device.type} tensor from a {gen_type} generator; "
                                 "use a CPU generator or one on the tensor's device")
            draw_device = torch.device("cpu")
    if isinstance(gens, list):
        if len(gens) != shape[0]:
            raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]}; pass one per sample")
        rows = [torch.randn((1,) + shape[1:], generator=g, device=draw_device, dtype=dtype) for g in gens]
        return to_device(torch.cat(rows, dim=0), device)
    return to_device(torch.randn(shape, generator=gens, device=draw_device, dtype=dtype), device)


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``; a CPU tensor goes to a CUDA device through pinned memory without making
    the host wait for the device (a plain copy from pageable memory synchronises the stream). Refused
    (RuntimeError) while the current stream captures a CUDA graph."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        if torch.cuda.is_current_stream_capturing():
            # a captured copy from pinned memory would replay the capture's values on every replay
            raise RuntimeError("a CPU tensor cannot be copied to the device inside a CUDA graph capture (each replay "
                               "would repeat the values of the capture); draw random numbers with a CUDA generator")
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
