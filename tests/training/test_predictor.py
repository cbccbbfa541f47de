"""Predictor: round trips (x0, eps) -> x_t, target -> (x0, eps) for the three parameterisations, and its
x0 estimate against diffusers' DDPMScheduler.step (pred_original_sample)."""

from __future__ import annotations

import diffusers
import pytest
import torch

from fusediff.training import Predictor, Schedule
from support.parity import assert_close, one_thread  # noqa: F401  (one_thread: autouse)

TYPES = ["epsilon", "sample", "v_prediction"]


@pytest.mark.parametrize("prediction_type", TYPES)
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_round_trip(prediction_type, beta_schedule):
    schedule = Schedule.from_scheduler(diffusers.DDPMScheduler(beta_schedule=beta_schedule))
    predictor = Predictor(prediction_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 100, 500, 900, 990])
    x_t = schedule.add_noise(x0, noise, t)
    target = predictor.target(x0, noise, t, schedule)
    assert_close(predictor(target, x_t, t, schedule), x0, f"{prediction_type}: x0", rtol=1e-9)
    assert_close(predictor.epsilon(target, x_t, t, schedule), noise, f"{prediction_type}: eps", rtol=1e-9)


@pytest.mark.parametrize("prediction_type", TYPES)
def test_x0_matches_diffusers_step(prediction_type):
    theirs = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                     prediction_type=prediction_type, clip_sample=False)
    schedule = Schedule.from_scheduler(theirs)
    predictor = Predictor(prediction_type)
    g = torch.Generator().manual_seed(1)
    for t in (0, 37, 600, 999):
        x_t, m = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 4, 5, 5, generator=g)
        expected = theirs.step(m, t, x_t, generator=torch.Generator().manual_seed(0)).pred_original_sample
        assert_close(predictor(m, x_t, torch.tensor([t, t]), schedule), expected, f"x0 at t={t}", rtol=1e-5)


def test_bad_prediction_type():
    with pytest.raises(ValueError, match="prediction_type"):
        Predictor("eps")
