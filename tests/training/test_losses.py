"""The loss helpers against diffusers: compute_snr, the min-SNR weights of its training scripts, the
velocity target of its schedulers, and the timestep draws against torch's own draws and statistics."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers.training_utils import compute_snr as diffusers_compute_snr

from fusediff.training import Schedule, compute_snr, loss_target, min_snr_weights, sample_timesteps
from support.parity import assert_close, one_thread  # noqa: F401  (one_thread: autouse)

SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]


def _theirs(beta_schedule: str, **kw) -> diffusers.DDPMScheduler:
    return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, **kw)


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
def test_compute_snr_matches_diffusers(beta_schedule):
    theirs = _theirs(beta_schedule)
    t = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(0))
    t[:3] = torch.tensor([0, 500, 999])
    expected = diffusers_compute_snr(theirs, t)
    for source in (Schedule.from_scheduler(theirs), theirs, theirs.alphas_cumprod):
        ours = compute_snr(source, t)
        assert_close(ours, expected, f"snr from {type(source).__name__}", rtol=1e-6)
    # and the definition abar / (1 - abar), in float64
    abar = theirs.alphas_cumprod.double()[t]
    assert_close(compute_snr(theirs, t).double(), abar / (1 - abar), "snr vs abar/(1-abar)", rtol=1e-5)


def test_compute_snr_keeps_timestep_shape():
    s = Schedule.from_scheduler(_theirs("linear"))
    t = torch.tensor([[1, 2], [3, 999]])
    assert compute_snr(s, t).shape == (2, 2)


def _diffusers_script_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """The min-SNR weights as diffusers' examples/text_to_image/train_text_to_image.py forms them."""
    w = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        w = w / snr
    elif prediction_type == "v_prediction":
        w = w / (snr + 1)
    return w


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_match_the_training_script_and_the_paper(prediction_type, gamma):
    theirs = _theirs("scaled_linear", prediction_type=prediction_type)
    t = torch.arange(0, 1000, 7)
    snr = diffusers_compute_snr(theirs, t)
    ours = min_snr_weights(snr, gamma, prediction_type)
    assert_close(ours, _diffusers_script_weights(snr, gamma, prediction_type), f"weights {prediction_type}", rtol=1e-6)
    # Hang et al. 2023: the x0-space weight min(SNR, gamma) is recovered by multiplying back the target's scale
    x0_weight = {"epsilon": ours * snr, "v_prediction": ours * (snr + 1), "sample": ours}[prediction_type]
    assert_close(x0_weight, torch.minimum(snr, torch.full_like(snr, gamma)), "x0-space weight", rtol=1e-5)


def test_min_snr_weights_reject_bad_input():
    with pytest.raises(ValueError, match="prediction_type"):
        min_snr_weights(torch.ones(2), 5.0, "eps")
    with pytest.raises(ValueError, match="gamma"):
        min_snr_weights(torch.ones(2), 0.0, "epsilon")


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
def test_loss_target(beta_schedule):
    theirs = _theirs(beta_schedule)
    schedule = Schedule.from_scheduler(theirs)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 3, 5, 6, generator=g), torch.randn(4, 3, 5, 6, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    assert loss_target("epsilon", x0, noise, t, schedule) is noise
    assert loss_target("sample", x0, noise, t, schedule) is x0
    expected = theirs.get_velocity(x0, noise, t)
    assert_close(loss_target("v_prediction", x0, noise, t, schedule), expected, "v from Schedule", rtol=1e-6)
    assert_close(loss_target("v_prediction", x0, noise, t, theirs), expected, "v from a scheduler", rtol=1e-6)
    with pytest.raises(ValueError, match="prediction_type"):
        loss_target("velocity", x0, noise, t, schedule)
    with pytest.raises(ValueError, match="same shape"):
        loss_target("epsilon", x0, noise[:2], t, schedule)


def test_uniform_timesteps_are_torch_randint():
    ours = sample_timesteps(1000, 50, generator=torch.Generator().manual_seed(3))
    assert ours.dtype == torch.int64 and ours.shape == (1000,)
    assert torch.equal(ours, torch.randint(0, 50, (1000,), generator=torch.Generator().manual_seed(3)))
    counts = torch.bincount(ours, minlength=50)
    assert counts.min() > 0 and ours.max() == 49


def test_logit_normal_timesteps_statistics():
    T, n = 1000, 20000
    t = sample_timesteps(n, T, generator=torch.Generator().manual_seed(4), kind="logit_normal")
    assert t.dtype == torch.int64 and 0 <= int(t.min()) and int(t.max()) <= T - 1
    # t / T = sigmoid(N(0, 1)): median 1/2, and P(t/T < sigmoid(-1)) = Phi(-1) = 0.1587
    u = (t.double() + 0.5) / T
    print("median", u.median().item(), "P(u < sigmoid(-1))", (u < torch.sigmoid(torch.tensor(-1.0))).double().mean())
    assert abs(u.median().item() - 0.5) < 0.02
    assert abs((u < torch.sigmoid(torch.tensor(-1.0, dtype=torch.float64))).double().mean().item() - 0.1587) < 0.015
    shifted = sample_timesteps(n, T, generator=torch.Generator().manual_seed(4), kind="logit_normal", logit_mean=1.0)
    assert shifted.double().mean() > t.double().mean() + 100


def test_sample_timesteps_reject_bad_input():
    with pytest.raises(ValueError, match="kind"):
        sample_timesteps(2, 10, kind="cosine")
    with pytest.raises(ValueError, match="batch"):
        sample_timesteps(0, 10)
    with pytest.raises(ValueError, match="num_timesteps"):
        sample_timesteps(2, 0)
    with pytest.raises(TypeError, match="integer"):
        compute_snr(torch.ones(3), torch.tensor([0.5]))
