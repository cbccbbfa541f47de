"""Schedule against the schedulers it is built from: the same alpha-bar table, and noising and velocity
equal to diffusers' ``add_noise``/``get_velocity``; buffers that move with ``.to``; ``to_scheduler``."""

from __future__ import annotations

import diffusers
import pytest
import torch

import fusediff
from fusediff.training import Schedule
from support.parity import assert_close, one_thread  # noqa: F401  (one_thread: autouse)

CONFIGS = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="linear", rescale_betas_zero_snr=True),
]
CLASSES = ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
           "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"]


# every class with every config, less PNDM with zero-SNR rescaling (PNDMScheduler does not take it)
CASES = [pytest.param(name, config, id=f"{name}-" + "-".join(str(v) for v in config.values()))
         for name in CLASSES for config in CONFIGS
         if not (name == "PNDMScheduler" and config.get("rescale_betas_zero_snr"))]


@pytest.mark.parametrize("name,config", CASES)
def test_from_scheduler_noises_as_diffusers(name, config):
    theirs, ours_scheduler = getattr(diffusers, name)(**config), getattr(fusediff, name)(**config)
    schedule = Schedule.from_scheduler(ours_scheduler)
    assert schedule.num_timesteps == 1000
    assert torch.equal(schedule.alphas_cumprod, theirs.alphas_cumprod.float()), "alpha-bar table"
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 3, 4, 6, generator=g), torch.randn(5, 3, 4, 6, generator=g)
    t = torch.tensor([0, 1, 400, 998, 999])
    if name in ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler"):  # add_noise on the alpha-bar table
        assert_close(schedule.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), f"{name} add_noise", rtol=1e-6)
    if name in ("DDPMScheduler", "DDIMScheduler"):  # the others have none, or one over sigma indices
        assert_close(schedule.velocity(x0, noise, t), theirs.get_velocity(x0, noise, t), f"{name} v", rtol=1e-6)
    # any scheduler: the definition, from its table in float64
    abar = theirs.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
    expected = abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()
    assert_close(schedule.add_noise(x0, noise, t).double(), expected, "x_t vs definition", rtol=1e-6)
    v = abar.sqrt() * noise.double() - (1 - abar).sqrt() * x0.double()
    assert_close(schedule.velocity(x0, noise, t).double(), v, "v vs definition", rtol=1e-6)


def test_half_precision_matches_diffusers():
    theirs = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    schedule = Schedule.from_scheduler(theirs)
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g).half(), torch.randn(4, 3, 8, 8, generator=g).half()
    t = torch.tensor([3, 200, 700, 999])
    ours = schedule.add_noise(x0, noise, t)
    assert ours.dtype == torch.float16
    assert_close(ours, theirs.add_noise(x0, noise, t), "fp16 add_noise", rtol=1e-3)
    assert_close(schedule.velocity(x0, noise, t), theirs.get_velocity(x0, noise, t), "fp16 v", rtol=1e-3)


def test_alpha_sigma_and_snr():
    schedule = Schedule.from_scheduler(fusediff.DDPMScheduler())
    t = torch.tensor([0, 999, 250])
    a, s = schedule.alpha_sigma(t, like=torch.zeros(3, 2, 5, 5, dtype=torch.float64))
    assert a.shape == s.shape == (3, 1, 1, 1) and a.dtype == torch.float64
    assert_close(a**2 + s**2, torch.ones_like(a), "a^2 + s^2", rtol=1e-6)
    a0, s0 = schedule.alpha_sigma(t)
    assert a0.shape == (3,) and a0.dtype == torch.float32
    assert_close(schedule.snr(t).double(), (a0.double() / s0.double()) ** 2, "snr", rtol=1e-5)
    with pytest.raises(TypeError, match="integer"):
        schedule.alpha_sigma(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="one per item"):
        schedule.add_noise(torch.zeros(3, 1), torch.zeros(3, 1), torch.tensor([1, 2]))


def test_buffers_move_with_to_and_are_not_saved():
    schedule = Schedule(torch.linspace(1e-4, 0.02, 100))
    assert {n for n, _ in schedule.named_buffers()} == {"betas", "alphas_cumprod"}
    assert schedule.state_dict() == {}
    moved = schedule.to("meta")
    assert moved.alphas_cumprod.device.type == "meta" and moved.betas.device.type == "meta"


def test_from_betas_is_the_cumulative_product():
    betas = torch.linspace(1e-4, 0.02, 50)
    schedule = Schedule(betas)
    assert_close(schedule.alphas_cumprod.double(), torch.cumprod(1 - betas.double(), 0), "alpha-bar", rtol=1e-6)


def test_to_scheduler_keeps_the_config_and_the_table():
    source = fusediff.DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False)
    ddim = Schedule.from_scheduler(source).to_scheduler()
    assert type(ddim) is fusediff.DDIMScheduler
    assert ddim.config.beta_schedule == "squaredcos_cap_v2" and ddim.config.clip_sample is False
    assert torch.equal(ddim.alphas_cumprod, source.alphas_cumprod)
    euler = Schedule.from_scheduler(source).to_scheduler(fusediff.EulerDiscreteScheduler,
                                                         prediction_type="v_prediction")
    assert euler.config.prediction_type == "v_prediction"
    # from betas alone: trained_betas
    betas = torch.linspace(1e-4, 0.02, 64)
    built = Schedule(betas).to_scheduler(fusediff.DDPMScheduler)
    assert built.config.num_train_timesteps == 64
    assert torch.equal(built.alphas_cumprod, Schedule(betas).alphas_cumprod)
    # a zero-terminal-SNR sigma schedule (last alpha-bar lifted to 2^-24) still converts to DDIM
    zero = Schedule.from_scheduler(fusediff.EulerDiscreteScheduler(rescale_betas_zero_snr=True))
    assert zero.alphas_cumprod[-1] > 0
    assert zero.to_scheduler().alphas_cumprod[-1] == 0
    # a diffusers scheduler's config is read too
    assert type(Schedule.from_scheduler(diffusers.DDPMScheduler()).to_scheduler()) is fusediff.DDIMScheduler


def test_bad_input():
    with pytest.raises(ValueError, match="betas"):
        Schedule(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="betas"):
        Schedule(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="alphas_cumprod"):
        Schedule(torch.full((4,), 0.1), alphas_cumprod=torch.ones(3))
    with pytest.raises(TypeError, match="scheduler"):
        Schedule.from_scheduler(object())
    with pytest.raises(TypeError, match="scheduler class"):
        Schedule(torch.full((4,), 0.1)).to_scheduler("DDIMScheduler")
