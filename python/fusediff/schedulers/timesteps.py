"""The timesteps of a run: how many steps a run may have, and where they fall in the trained schedule.

A run of n steps over T trained timesteps visits n of them in descending order, spaced as the config's
``timestep_spacing`` says: linspace, leading or trailing (Lin et al. 2024, table 2 names them). The
single-step schedulers (DDPM, DDIM, PNDM, and the sigma samplers' integer spacings) take
:func:`spaced_timesteps`; the multistep solvers lay out n + 1 points and drop the last
(:func:`multistep_timesteps`), as diffusers' schedulers of the same names do.

Limits: timesteps are int64 numpy arrays here; fractional timesteps (the sigma samplers' linspace
spacing, resampled noise levels) are made by the schedulers that use them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def check_num_inference_steps(num_inference_steps: Any, num_train_timesteps: int) -> int:
    """``num_inference_steps`` as an int in [1, num_train_timesteps]; raises otherwise."""
    if num_inference_steps is None:
        raise TypeError("set_timesteps needs num_inference_steps (the number of denoising steps)")
    if isinstance(num_inference_steps, bool) or int(num_inference_steps) != num_inference_steps:
        raise TypeError(f"num_inference_steps must be an integer; got {num_inference_steps!r}")
    n = int(num_inference_steps)
    if n > num_train_timesteps:
        raise ValueError(f"num_inference_steps = {n} exceeds num_train_timesteps = {num_train_timesteps}: a run "
                         "cannot have more steps than the timesteps the model was trained on")
    if n < 1:
        raise ValueError(f"num_inference_steps must be at least 1; got {n}")
    return n


def _unknown_spacing(spacing: str) -> ValueError:
    return ValueError(f"timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}; got {spacing!r}")


def spaced_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str,
                     steps_offset: int = 0) -> np.ndarray:
    """Descending int64 timesteps of a strided run.

    linspace: round(linspace(0, T-1, n)); leading: k * (T // n) + steps_offset;
    trailing: round(T - k * T/n) - 1, which always includes t = T - 1.
    """
    T, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round() + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n))[::-1] - 1
    else:
        raise _unknown_spacing(spacing)
    return ts[::-1].astype(np.int64)


def multistep_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str, steps_offset: int = 0,
                        last_timestep: int | None = None) -> np.ndarray:
    """Descending int64 timesteps of a multistep run.

    The run has n + 1 points of which the last (t = 0 side) is dropped, the step after the final
    timestep going to the final sigma. ``last_timestep`` (<= T) ends the range early, as DPM-Solver's
    ``lambda_min_clipped`` does: linspace: round(linspace(0, last - 1, n + 1)); leading:
    k * (last // (n + 1)) + steps_offset; trailing: round(arange(last, 0, -T/n)) - 1.
    """
    T, n = num_train_timesteps, num_inference_steps
    last = T if last_timestep is None else last_timestep
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1] + steps_offset
    elif spacing == "trailing":
        ts = np.arange(last, 0, -T / n).round() - 1
    else:
        raise _unknown_spacing(spacing)
    return ts.copy().astype(np.int64)
