"""Validation for UNet2DModel: its config at construction, its timesteps and labels at each call.

DESIGN.md, decision 3: a bad config or a bad input is a ValueError (TypeError for a wrong
type) that names the offending key or argument, raised before any computation, never a shape
error from deep inside a conv.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(config: Mapping[str, Any], key: str, optional: bool = False) -> None:
    value = config[key]
    if optional and value is None:
        return
    if not is_int(value) or value < 1:
        raise ValueError(f"{key} must be a positive int{' or None' if optional else ''}; got {value!r}")


def one_of(config: Mapping[str, Any], key: str, allowed: Sequence[Any]) -> None:
    if config[key] not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(map(repr, allowed))}; got {config[key]!r}")


def sequence_value(config: Mapping[str, Any], key: str) -> list[Any]:
    value = config[key]
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) == 0:
        raise ValueError(f"{key} must be a non-empty list or tuple; got {value!r}")
    return list(value)


def check_levels(config: Mapping[str, Any], down_types: Sequence[str], up_types: Sequence[str],
                 model: str) -> list[int]:
    """The UNet's ``block_out_channels``, after checking them, one supported down and up block type per
    level (``UNetRes`` prefixes allowed), and that ``norm_num_groups`` divides every width."""
    channels = sequence_value(config, "block_out_channels")
    if not all(is_int(c) and c > 0 for c in channels):
        raise ValueError(f"block_out_channels must hold positive ints; got {channels!r}")
    for key, supported in (("down_block_types", down_types), ("up_block_types", up_types)):
        types = sequence_value(config, key)
        if len(types) != len(channels):
            raise ValueError(f"{key} has {len(types)} entries but block_out_channels has {len(channels)}; "
                             "there must be one block type per resolution")
        bad = [t for t in types if not isinstance(t, str) or t.removeprefix("UNetRes") not in supported]
        if bad:
            raise ValueError(f"{key}: block type {bad[0]!r} is not supported by fusediff's {model} "
                             f"(supported: {', '.join(supported)})")
    groups = config["norm_num_groups"]
    bad = [c for c in channels if c % groups]
    if bad:
        raise ValueError(f"norm_num_groups={groups} must divide every entry of block_out_channels; "
                         f"{', '.join(map(str, bad))} is not divisible")
    return channels


def check_config(config: Mapping[str, Any], *, down_types: Sequence[str], up_types: Sequence[str],
                 mid_types: Sequence[str], time_embedding_types: Sequence[str],
                 class_embed_types: Sequence[str | None], time_embedding_norms: Sequence[str]) -> None:
    """Raise ValueError naming the first key of a UNet2DModel ``config`` that cannot build a working model."""
    for key in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
        positive_int(config, key)
    for key in ("time_embedding_dim", "attention_head_dim", "attn_norm_num_groups", "num_class_embeds"):
        positive_int(config, key, optional=True)
    channels = check_levels(config, down_types, up_types, "UNet2DModel")
    one_of(config, "mid_block_type", (None, *mid_types))
    one_of(config, "time_embedding_type", time_embedding_types)
    one_of(config, "class_embed_type", class_embed_types)
    one_of(config, "resnet_time_scale_shift", time_embedding_norms)
    one_of(config, "downsample_type", (None, "conv", "resnet"))
    one_of(config, "upsample_type", (None, "conv", "resnet"))
    if config["time_embedding_type"] == "learned":
        positive_int(config, "num_train_timesteps")

    attn_groups = config["attn_norm_num_groups"]
    if attn_groups is not None and channels[-1] % attn_groups:
        raise ValueError(f"attn_norm_num_groups={attn_groups} must divide block_out_channels[-1]={channels[-1]}")
    if not isinstance(config["downsample_padding"], numbers.Integral) or config["downsample_padding"] < 0:
        raise ValueError(f"downsample_padding must be an int >= 0; got {config['downsample_padding']!r}")
    dropout = config["dropout"]
    if not isinstance(dropout, numbers.Real) or not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1]; got {dropout!r}")
    eps = config["norm_eps"]
    if not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"norm_eps must be a float >= 0; got {eps!r}")


def timesteps_for_batch(value: torch.Tensor | float | int, batch: int, device: torch.device,
                        what: str = "timestep") -> torch.Tensor:
    """``value`` as a (batch,) tensor on ``device``: a number or one value is repeated for every sample.

    A Python int becomes int64, a Python float float32; a tensor keeps its dtype. Accepts a
    0-d tensor and (1,) or (batch,) tensors; anything else is a ValueError naming ``what``.
    """
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a number or a tensor, not a bool")
    if isinstance(value, numbers.Integral):
        value = torch.tensor([int(value)], dtype=torch.long, device=device)
    elif isinstance(value, numbers.Real):
        value = torch.tensor([float(value)], dtype=torch.float32, device=device)
    elif not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} must be a number or a torch.Tensor; got {type(value).__name__}")
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{what} must be an integer or floating tensor; got {value.dtype}")
    if value.dim() == 0:
        value = value[None]
    if value.dim() != 1 or value.shape[0] not in (1, batch):
        raise ValueError(f"{what} must be a number, a 0-d tensor, or a tensor of shape (1,) or ({batch},) for a "
                         f"batch of {batch}; got shape {tuple(value.shape)}")
    return value.to(device).expand(batch)


def check_index_range(indices: torch.Tensor, size: int, what: str) -> None:
    """Raise unless ``indices`` are integers in [0, size).

    CPU tensors are read: an out-of-range value is a ValueError naming the extremes. CUDA (and meta) tensors
    are never read back (that would make every model call wait for the GPU, in sampling and
    training loops alike): the check is a device-side assertion (``torch._assert_async``, a
    RuntimeError when the stream next synchronises), as an out-of-range embedding index would
    be anyway; ClassConditionalPipeline checks its labels on the host before they reach the device.
    Under ``torch.compile`` the check is the same assertion inside the graph (RuntimeError on
    the CPU). While a CUDA graph records, the check is skipped.
    """
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"{what} indices must be an integer tensor; got {indices.dtype}")
    if indices.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # an assertion kernel inside a captured graph would fire on every replay's memory
    if torch.compiler.is_compiling() or indices.device.type != "cpu":
        torch._assert_async(((indices >= 0) & (indices < size)).all(), f"{what} indices must lie in [0, {size})")
        return
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= size):
        raise ValueError(f"{what} indices must lie in [0, {size}); got values from {int(indices.min())} "
                         f"to {int(indices.max())}")
