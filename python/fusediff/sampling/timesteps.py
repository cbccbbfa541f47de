"""The timesteps of one sampling run: set on the scheduler, cut by ``strength``, kept on the host.

A run steps the scheduler with the CPU copy of its timesteps and gives the model a device copy
made once before the loop (:func:`loop_timesteps`), so that no step waits for the device.
Timesteps are set without a device (the scheduler's tables stay on the host), as the fusediff
schedulers read them there; any scheduler with diffusers' ``set_timesteps`` works.

img2img and inpainting (SDEdit, Meng et al. 2022) run the last ``int(n * strength)`` of the n
scheduled steps, t_1 > ... > t_k; the scheduler is told where the run begins
(``set_begin_index``), as diffusers' pipelines tell it.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import torch

from ..utils.torch_utils import to_device


@dataclasses.dataclass(frozen=True)
class Timesteps:
    """The timesteps of a run, set on its scheduler.

    Attributes:
        host: the timesteps the loop steps through, on the CPU (``scheduler.step`` gets these).
        num_inference_steps: the model evaluations the run counts as steps: n, or the steps left
            after ``strength``; a scheduler of order 2 (Heun) makes about twice as many calls.
    """

    host: torch.Tensor
    num_inference_steps: int

    def __len__(self) -> int:
        return len(self.host)


def host_timesteps(scheduler: Any) -> torch.Tensor:
    """The scheduler's timesteps on the CPU: fusediff schedulers keep a copy; others' are copied back."""
    host = getattr(scheduler, "host_timesteps", None)
    return host if isinstance(host, torch.Tensor) else torch.as_tensor(scheduler.timesteps).cpu()


def check_steps(num_inference_steps: Any) -> int:
    """``num_inference_steps`` as an int; ValueError unless it is a positive int."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int; got {num_inference_steps!r}")
    return num_inference_steps


def check_strength(strength: Any) -> float:
    """``strength`` as a float; ValueError unless it is a number in [0, 1]."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1]; got {strength!r}")
    return float(strength)


def set_timesteps(scheduler: Any, num_inference_steps: int | None = None, *,
                  timesteps: Sequence[int] | None = None, sigmas: Sequence[float] | None = None,
                  strength: float | None = None) -> Timesteps:
    """Set the run's timesteps on ``scheduler`` (a step count, or custom ``timesteps`` or ``sigmas``),
    then keep the last ``int(n * strength)`` of them if ``strength`` is given.

    Raises ValueError for a bad count, both custom kinds at once, a scheduler that takes no custom
    values of that kind, a strength outside [0, 1] or one that leaves no step.
    """
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass custom timesteps or custom sigmas, not both")
    custom = {"timesteps": timesteps} if timesteps is not None else {"sigmas": sigmas} if sigmas is not None else {}
    if custom:
        name = next(iter(custom))
        if name not in inspect.signature(scheduler.set_timesteps).parameters:
            raise ValueError(f"{type(scheduler).__name__}.set_timesteps takes no custom {name}")
        scheduler.set_timesteps(**custom)
        n = len(scheduler.timesteps)
    else:
        n = check_steps(num_inference_steps)
        scheduler.set_timesteps(n)
    run = Timesteps(host_timesteps(scheduler), n)
    return run if strength is None else _strength_cut(scheduler, run, strength)


def _strength_cut(scheduler: Any, run: Timesteps, strength: float) -> Timesteps:
    """The last int(n * strength) steps of ``run``; the scheduler begins there."""
    strength = check_strength(strength)
    n = run.num_inference_steps
    order = getattr(scheduler, "order", 1)
    t_start = max(n - min(int(n * strength), n), 0)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * order)
    remaining = n - t_start
    if remaining < 1:
        raise ValueError(f"strength {strength} of {n} steps leaves no step to run; "
                         "raise strength or num_inference_steps")
    return Timesteps(run.host[t_start * order:], remaining)


def loop_timesteps(timesteps: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(host, device) copies of a run's timesteps, made before the loop: the scheduler steps with
    ``host[i]`` and the model reads ``device[i]``, so no step waits for the device."""
    host = torch.as_tensor(timesteps).cpu()
    return host, to_device(host, device)
