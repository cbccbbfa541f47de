"""Batch transforms for training: nn.Modules that take a dict batch and return a new dict.

Each transform reads and writes tensor entries of a dict batch (``"sample"`` (B, C, H, W) by default),
leaves the input dict unchanged, and works per item of the batch, so they stack with ``nn.Sequential``
and run on the device the batch is on. The tensor-only ones (Normalize, RandomHorizontalFlip,
RandomCrop, AddNoise) trace into one graph with ``torch.compile(fullgraph=True)``.

- Normalize: (x - mean) / std per channel (e.g. mean = std = 0.5 maps [0, 1] to [-1, 1]).
- RandomHorizontalFlip, RandomCrop: per-item random flips and crops, the same for every key of an item.
- VAEEncode: images to scaled latents z = scaling_factor (z' - shift) with z' ~ q(z|x) of a KL autoencoder
  (Rombach et al. 2022, sec. 4.3.2 and appendix D.1), under ``torch.no_grad``.
- AddNoise: draws eps and t and adds ``noise``, ``timesteps`` and ``noisy`` = x_t (Ho et al. 2020, eq. 4).

Randomness comes from ``forward(batch, generator=None)``'s generator, else the global RNG of the batch's
device. Limits: images only ((B, C, H, W) for flips and crops); crops pad with zeros.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.torch_utils import randn_tensor
from .losses import TIMESTEP_SAMPLINGS, draw, sample_timesteps
from .schedule import Schedule


def _keys(keys: str | Sequence[str]) -> tuple[str, ...]:
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    if not keys or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"keys must be a non-empty sequence of strings; got {keys!r}")
    return keys


def _get(batch: Mapping[str, Any], key: str, owner: str, dims: int | None = None) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise TypeError(f"{owner} takes a dict batch; got {type(batch).__name__}")
    value = batch.get(key)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{owner}: the batch has no tensor {key!r} (keys: {sorted(batch)})")
    if dims is not None and value.dim() != dims:
        raise ValueError(f"{owner}: batch[{key!r}] must be {dims}-D (B, C, H, W); got shape {tuple(value.shape)}")
    return value


class Normalize(nn.Module):
    """batch[key] <- (batch[key] - mean) / std, with a scalar or per-channel (dim 1) mean and std."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float], key: str = "sample") -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32)
        std_t = torch.as_tensor(std, dtype=torch.float32)
        for name, value in (("mean", mean_t), ("std", std_t)):
            if value.dim() > 1:
                raise ValueError(f"{name} must be a number or a per-channel sequence; got shape {tuple(value.shape)}")
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be positive; got {std!r}")
        self.key = key
        self.register_buffer("mean", mean_t.reshape(-1, 1, 1) if mean_t.dim() else mean_t, persistent=False)
        self.register_buffer("std", std_t.reshape(-1, 1, 1) if std_t.dim() else std_t, persistent=False)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        x = _get(batch, self.key, "Normalize")
        return {**batch, self.key: (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)}


class RandomHorizontalFlip(nn.Module):
    """Flip each item along W with probability ``p`` (one draw per item, shared by all ``keys``)."""

    def __init__(self, p: float = 0.5, keys: str | Sequence[str] = ("sample",)) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"p must be a number in [0, 1]; got {p!r}")
        self.p = float(p)
        self.keys = _keys(keys)

    def forward(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        first = _get(batch, self.keys[0], "RandomHorizontalFlip", 4)
        flip = draw((first.shape[0],), first.device, generator) < self.p  # (B,)
        out = dict(batch)
        for key in self.keys:
            x = _get(batch, key, "RandomHorizontalFlip", 4)
            out[key] = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return out


class RandomCrop(nn.Module):
    """Crop each item to ``size`` (h, w) at a random offset (one per item, shared by all ``keys``), after
    zero-padding H and W by ``padding`` on each side."""

    def __init__(self, size: int | Sequence[int], keys: str | Sequence[str] = ("sample",), padding: int = 0) -> None:
        super().__init__()
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
            raise ValueError(f"size must be a positive int or (h, w); got {size!r}")
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be a non-negative int; got {padding!r}")
        self.size = size
        self.keys = _keys(keys)
        self.padding = padding

    def forward(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        first = _get(batch, self.keys[0], "RandomCrop", 4)
        B, H, W = first.shape[0], first.shape[2] + 2 * self.padding, first.shape[3] + 2 * self.padding
        h, w = self.size
        if h > H or w > W:
            raise ValueError(f"RandomCrop: crop {self.size} is larger than the padded sample ({H}, {W})")
        device = first.device
        # 1. per-item offsets in [0, H - h] x [0, W - w]
        top = (draw((B,), device, generator) * (H - h + 1)).long().clamp(max=H - h)  # (B,)
        left = (draw((B,), device, generator) * (W - w + 1)).long().clamp(max=W - w)
        rows = top[:, None] + torch.arange(h, device=device)  # (B, h)
        cols = left[:, None] + torch.arange(w, device=device)  # (B, w)
        items = torch.arange(B, device=device)[:, None, None]  # (B, 1, 1)
        out = dict(batch)
        for key in self.keys:
            x = _get(batch, key, "RandomCrop", 4)
            if x.shape[0] != B or x.shape[2:] != first.shape[2:]:
                raise ValueError(f"RandomCrop: batch[{key!r}] has shape {tuple(x.shape)}; the keys must share B, H, W")
            if self.padding:
                x = F.pad(x, (self.padding,) * 4)
            # 2. gather the window: x[b, :, rows[b], cols[b]] -> (B, h, w, C) -> (B, C, h, w)
            out[key] = x.permute(0, 2, 3, 1)[items, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        return out


class VAEEncode(nn.Module):
    """batch[key] <- scaling_factor * (z - shift_factor), z ~ q(z | batch[key]) of a KL autoencoder (no gradients).

    Args:
        vae: an AutoencoderKL (fusediff's or diffusers'): ``encode(x).latent_dist`` with ``sample``/``mode``.
        scaling_factor: latent scale; None reads ``vae.config.scaling_factor`` (and ``shift_factor``, if any).
        key: the image entry, (B, C, H, W) in [-1, 1]; replaced by its latents.
        sample_posterior: draw z from the posterior (as diffusers' training scripts) rather than take its mean.
    """

    def __init__(self, vae: nn.Module, scaling_factor: float | None = None, key: str = "sample",
                 sample_posterior: bool = True) -> None:
        super().__init__()
        if not hasattr(vae, "encode"):
            raise TypeError(f"vae must have encode(); got {type(vae).__name__}")
        config = getattr(vae, "config", None)
        shift = getattr(config, "shift_factor", None) if config is not None else None
        if scaling_factor is None:
            scaling_factor = getattr(config, "scaling_factor", None) if config is not None else None
            if scaling_factor is None:
                raise ValueError("scaling_factor is None and the vae's config has none; pass scaling_factor")
        else:
            shift = None
        self.vae = vae
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift) if shift is not None else 0.0
        self.key = key
        self.sample_posterior = bool(sample_posterior)

    def forward(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        x = _get(batch, self.key, "VAEEncode", 4)
        with torch.no_grad():
            dist = self.vae.encode(x.to(self.vae.dtype) if hasattr(self.vae, "dtype") else x).latent_dist
            z = dist.sample(generator=generator) if self.sample_posterior else dist.mode()
            z = (z - self.shift_factor) * self.scaling_factor
        return {**batch, self.key: z}


class AddNoise(nn.Module):
    """Add ``noise`` (eps ~ N(0, I)), ``timesteps`` (t ~ p(t)) and ``noisy`` (x_t) to the batch, drawn in
    that order, the order :class:`~fusediff.training.Sampler` draws them in when the batch lacks them."""

    def __init__(self, schedule: Schedule, timestep_sampling: str = "uniform", key: str = "sample") -> None:
        super().__init__()
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a Schedule; got {type(schedule).__name__}")
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLINGS)}; "
                             f"got {timestep_sampling!r}")
        self.schedule = schedule
        self.timestep_sampling = timestep_sampling
        self.key = key

    def forward(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        x0 = _get(batch, self.key, "AddNoise")
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t = sample_timesteps(x0.shape[0], self.schedule.num_timesteps, x0.device, generator,
                             kind=self.timestep_sampling)
        return {**batch, "noise": noise, "timesteps": t, "noisy": self.schedule.add_noise(x0, noise, t)}
