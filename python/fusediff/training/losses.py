"""The pieces of the denoising loss: targets, signal-to-noise ratios, min-SNR weights, timestep draws.

- :func:`loss_target`: what the model is trained to output for x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps:
  eps (Ho et al. 2020, eq. 14), x0, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022, sec. 4).
- :func:`compute_snr`: SNR(t) = abar_t / (1 - abar_t) (Kingma et al. 2021, eq. 1), the numbers of
  ``diffusers.training_utils.compute_snr``.
- :func:`min_snr_weights`: the min-SNR-gamma loss weights (Hang et al. 2023, arXiv:2303.09556, eq. 7 and
  sec. 3.4), expressed for each prediction type as diffusers' training scripts use them.
- :func:`sample_timesteps`: t ~ U{0..T-1}, or t = floor(T sigmoid(n)), n ~ N(m, s) ("logit-normal",
  Esser et al. 2024, sec. 3.1).

Limits: with zero terminal SNR, the epsilon weight min(snr, gamma) / snr is 0/0 at the last timestep
(epsilon prediction is undefined there anyway); no other weighting schemes (P2, EDM) are provided.
"""

from __future__ import annotations

from typing import Any

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def check_prediction_type(prediction_type: Any) -> str:
    """``prediction_type`` if it is one of :data:`PREDICTION_TYPES`; ValueError otherwise."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {prediction_type!r}")
    return prediction_type


def _alphas_cumprod(source: Any) -> torch.Tensor:
    """The alpha-bar table of a Schedule, a scheduler (fusediff's or diffusers'), or the table itself."""
    table = source if isinstance(source, torch.Tensor) else getattr(source, "alphas_cumprod", None)
    if not isinstance(table, torch.Tensor):
        raise TypeError("expected a Schedule, a scheduler with alphas_cumprod, or an alphas_cumprod tensor; "
                        f"got {type(source).__name__}")
    if table.dim() != 1:
        raise ValueError(f"alphas_cumprod must be 1-D; got shape {tuple(table.shape)}")
    return table


def _check_timesteps(t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
        what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"timesteps must be an integer tensor; got {what}")
    return t


def compute_snr(schedule_or_alphas_cumprod: Any, t: torch.Tensor) -> torch.Tensor:
    """SNR(t) = abar_t / (1 - abar_t) in float32, shaped like ``t`` and on its device.

    Formed as (sqrt(abar_t) / sqrt(1 - abar_t))^2 from the float32 table, the float32 operations of
    ``diffusers.training_utils.compute_snr``, so both give the same numbers.
    """
    table = _alphas_cumprod(schedule_or_alphas_cumprod)
    t = _check_timesteps(t)
    table = table.to(device=t.device)
    alpha = (table**0.5)[t].float()  # sqrt(abar_t), t's shape
    sigma = ((1.0 - table) ** 0.5)[t].float()  # sqrt(1 - abar_t)
    return (alpha / sigma) ** 2


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-item loss weights of min-SNR-gamma (Hang et al. 2023) for an MSE on ``prediction_type``'s target.

    The x0-space weight min(SNR, gamma) becomes min(SNR, gamma) / SNR on epsilon (whose MSE is the x0
    MSE times SNR), min(SNR, gamma) / (SNR + 1) on v, and stays min(SNR, gamma) on x0.
    """
    check_prediction_type(prediction_type)
    if not isinstance(snr, torch.Tensor):
        raise TypeError(f"snr must be a tensor; got {type(snr).__name__}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
        raise ValueError(f"gamma (snr_gamma) must be a positive number; got {gamma!r}")
    clipped = torch.clamp(snr, max=float(gamma))  # min(SNR, gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def loss_target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                schedule: Any) -> torch.Tensor:
    """The regression target for ``prediction_type``: ``noise`` (epsilon), ``x0`` (sample), or the
    velocity v_t = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (v_prediction).

    ``schedule`` is a :class:`~fusediff.training.Schedule` (``velocity``) or a scheduler (``get_velocity``);
    it is only read for v_prediction.
    """
    check_prediction_type(prediction_type)
    if x0.shape != noise.shape:
        raise ValueError(f"x0 and noise must have the same shape; got {tuple(x0.shape)} and {tuple(noise.shape)}")
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    velocity = getattr(schedule, "velocity", None) or getattr(schedule, "get_velocity", None)
    if velocity is None:
        raise TypeError(f"schedule must have velocity() or get_velocity(); got {type(schedule).__name__}")
    return velocity(x0, noise, t)


def draw(shape: tuple[int, ...], device: torch.device | str | None, generator: torch.Generator | None,
         kind: str = "rand", dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.rand`` or ``torch.randn`` of ``shape`` on ``device``, drawn on the generator's device (then
    moved) so that a CPU generator seeds draws for any device; the global RNG without a generator."""
    fn = torch.rand if kind == "rand" else torch.randn
    device = torch.device(device) if device is not None else torch.device("cpu")
    if generator is None or generator.device.type == device.type:
        return fn(shape, generator=generator, device=device, dtype=dtype)
    if generator.device.type != "cpu":
        raise ValueError(f"cannot draw a {device.type} tensor from a {generator.device.type} generator; "
                         "use a CPU generator or one on the tensor's device")
    return fn(shape, generator=generator, dtype=dtype).to(device)


def sample_timesteps(batch: int, num_timesteps: int, device: torch.device | str | None = None,
                     generator: torch.Generator | None = None, kind: str = "uniform",
                     logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """(batch,) int64 training timesteps in [0, num_timesteps).

    ``kind="uniform"``: t ~ U{0, ..., T-1} (one ``torch.randint``, as diffusers' training scripts draw it);
    ``kind="logit_normal"``: t = min(floor(T sigmoid(n)), T - 1), n ~ N(logit_mean, logit_std^2), which puts
    more weight on the middle timesteps (Esser et al. 2024, eq. 19).
    """
    for name, value in (("batch", batch), ("num_timesteps", num_timesteps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if kind == "uniform":
        if generator is not None and generator.device.type != device.type:
            return torch.randint(0, num_timesteps, (batch,), generator=generator,
                                 device=generator.device).to(device)
        return torch.randint(0, num_timesteps, (batch,), generator=generator, device=device)
    if kind == "logit_normal":
        if not logit_std > 0:
            raise ValueError(f"logit_std must be positive; got {logit_std!r}")
        n = draw((batch,), device, generator, kind="randn") * logit_std + logit_mean
        return (torch.sigmoid(n) * num_timesteps).long().clamp(max=num_timesteps - 1)
    raise ValueError(f"kind (timestep_sampling) must be one of {', '.join(TIMESTEP_SAMPLINGS)}; got {kind!r}")
