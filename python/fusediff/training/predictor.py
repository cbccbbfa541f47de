"""Predictor: what a denoising model's output means, as the loss target and as estimates of x0 and eps.

With x_t = a x0 + s eps, a = sqrt(abar_t), s = sqrt(1 - abar_t) and a^2 + s^2 = 1, a model output m is
read as
    epsilon:      eps = m,                 x0 = (x_t - s m) / a       (Ho et al. 2020, eq. 15)
    sample:       x0 = m,                  eps = (x_t - a m) / s
    v_prediction: x0 = a x_t - s m,        eps = a m + s x_t          (Salimans & Ho 2022, sec. 4, eq. 11)
and the training target is the quantity the output stands for (:func:`~fusediff.training.loss_target`).

Limits: the reads divide by a (epsilon) or s (sample), so they are undefined at abar_t = 0 (epsilon)
or abar_t = 1 (sample); no clipping or thresholding is applied (the samplers' schedulers do that).
"""

from __future__ import annotations

import torch
from torch import nn

from .losses import check_prediction_type, loss_target
from .schedule import Schedule


class Predictor(nn.Module):
    """The parameterisation of a model's output: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.

    ``target(x0, noise, t, schedule)`` is the regression target; ``forward(model_output, x_t, t, schedule)``
    the x0 it implies and ``epsilon(...)`` the noise it implies.
    """

    def __init__(self, prediction_type: str = "epsilon") -> None:
        super().__init__()
        self.prediction_type = check_prediction_type(prediction_type)

    def extra_repr(self) -> str:
        return f"prediction_type={self.prediction_type!r}"

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        """The loss target for x_t = add_noise(x0, noise, t)."""
        return loss_target(self.prediction_type, x0, noise, t, schedule)

    def forward(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                schedule: Schedule) -> torch.Tensor:
        """x0_hat, the clean sample the output ``model_output`` at (x_t, t) implies."""
        a, s = schedule.alpha_sigma(t, like=x_t)
        if self.prediction_type == "epsilon":
            return (x_t - s * model_output) / a
        if self.prediction_type == "sample":
            return model_output
        return a * x_t - s * model_output

    def epsilon(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                schedule: Schedule) -> torch.Tensor:
        """eps_hat, the noise the output ``model_output`` at (x_t, t) implies."""
        a, s = schedule.alpha_sigma(t, like=x_t)
        if self.prediction_type == "epsilon":
            return model_output
        if self.prediction_type == "sample":
            return (x_t - a * model_output) / s
        return a * model_output + s * x_t
