"""Sampler: the training loss against the loss written out by hand with diffusers' scheduler (the DDPM loss
of its training scripts, with and without min-SNR weighting), sampling against fusediff's DDIMPipeline,
a short training run, and torch.compile(fullgraph=True) of the training forward."""

from __future__ import annotations

import diffusers
import pytest
import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr as diffusers_compute_snr

import fusediff
from fusediff import DDIMPipeline, UNet2DModel
from fusediff.training import (AddNoise, ClassConditioning, ClassifierFreeGuidance, Predictor, Sampler, Schedule,
                               UNetAdapter)
from support.configs import TINY_UNET
from support.parity import assert_close, one_thread  # noqa: F401  (one_thread: autouse)

TYPES = ["epsilon", "sample", "v_prediction"]


def _unet(seed: int = 0, **extra) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**TINY_UNET, **extra)


def _batch(b: int = 4, seed: int = 1) -> dict:
    return {"sample": torch.randn(b, 3, 8, 8, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)}


def _hand_loss(unet, theirs, x0, noise, t, weights=None):
    """The DDPM loss as diffusers' training scripts write it."""
    noisy = theirs.add_noise(x0, noise, t)
    pred = unet(noisy, t).sample
    kind = theirs.config.prediction_type
    target = {"epsilon": noise, "sample": x0, "v_prediction": theirs.get_velocity(x0, noise, t)}[kind]
    if weights is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    return (loss.mean(dim=list(range(1, loss.dim()))) * weights).mean()


@pytest.mark.parametrize("prediction_type", TYPES)
def test_train_loss_is_the_ddpm_loss(prediction_type):
    theirs = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    unet = _unet()
    sampler = Sampler(UNetAdapter(unet), Predictor(prediction_type), Schedule.from_scheduler(theirs)).train()
    batch = _batch()
    g = torch.Generator().manual_seed(2)
    noise, t = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([0, 17, 500, 999])
    loss = sampler({**batch, "noise": noise, "timesteps": t})
    assert loss.dim() == 0 and loss.dtype == torch.float32
    expected = _hand_loss(unet, theirs, batch["sample"], noise, t)
    assert_close(loss.detach(), expected.detach(), f"{prediction_type} loss", rtol=1e-6)
    # drawn by the sampler: noise first, then t, from the generator (the scripts' order)
    g = torch.Generator().manual_seed(3)
    drawn = sampler(batch, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    assert_close(drawn.detach(), _hand_loss(unet, theirs, batch["sample"], noise, t).detach(), "drawn", rtol=1e-6)


@pytest.mark.parametrize("prediction_type", TYPES)
def test_min_snr_loss_matches_train_text_to_image(prediction_type):
    gamma = 5.0
    theirs = diffusers.DDPMScheduler(prediction_type=prediction_type)
    unet = _unet()
    sampler = Sampler(UNetAdapter(unet), Predictor(prediction_type), Schedule.from_scheduler(theirs),
                      loss_weighting="min_snr", snr_gamma=gamma)
    batch = _batch()
    noise, t = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([1, 50, 600, 990])
    # train_text_to_image.py: min(snr, gamma) by stack/min, / snr (epsilon) or / (snr + 1) (v)
    snr = diffusers_compute_snr(theirs, t)
    weights = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        weights = weights / snr
    elif prediction_type == "v_prediction":
        weights = weights / (snr + 1)
    expected = _hand_loss(unet, theirs, batch["sample"], noise, t, weights)
    loss = sampler({**batch, "noise": noise, "timesteps": t})
    assert_close(loss.detach(), expected.detach(), f"min-SNR {prediction_type}", rtol=1e-6)
    plain = Sampler(UNetAdapter(unet), Predictor(prediction_type), Schedule.from_scheduler(theirs))
    assert not torch.allclose(loss, plain({**batch, "noise": noise, "timesteps": t})), "the weights change the loss"


def test_add_noise_batch_gives_the_same_loss():
    schedule = Schedule.from_scheduler(fusediff.DDPMScheduler())
    sampler = Sampler(UNetAdapter(_unet()), Predictor("epsilon"), schedule)
    batch = _batch()
    noised = AddNoise(schedule)(batch, generator=torch.Generator().manual_seed(5))
    assert_close(sampler(noised).detach(), sampler(batch, generator=torch.Generator().manual_seed(5)).detach(),
                 "AddNoise batch vs drawn", rtol=1e-7)
    with pytest.raises(ValueError, match="noisy"):
        sampler({"sample": batch["sample"], "noisy": noised["noisy"]})


@pytest.mark.parametrize("prediction_type,eta", [("epsilon", 0.0), ("epsilon", 0.7), ("v_prediction", 0.0)])
def test_eval_is_ddim_pipeline(prediction_type, eta):
    unet = _unet(seed=6).eval()
    config = fusediff.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    pipe = DDIMPipeline(unet=unet, scheduler=config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(7), eta=eta, num_inference_steps=10,
                  output_type="pt").images
    sampler = Sampler(UNetAdapter(unet), Predictor(prediction_type), Schedule.from_scheduler(config), eta=eta).eval()
    x0 = sampler.sample(2, (3, 8, 8), generator=torch.Generator().manual_seed(7), num_inference_steps=10)
    assert_close((x0 * 0.5 + 0.5).clamp(0, 1), images, f"sampler vs DDIMPipeline ({prediction_type}, eta={eta})",
                 rtol=1e-6)
    # forward in eval mode on a batch holding x_T
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    if eta == 0.0:
        assert_close(sampler({"noise": noise}, num_inference_steps=10), x0, "forward(batch)", rtol=1e-6)


def test_eval_with_another_scheduler_is_its_loop():
    unet = _unet(seed=8).eval()
    source = fusediff.DDPMScheduler()
    sampler = Sampler(UNetAdapter(unet), Predictor("epsilon"), Schedule.from_scheduler(source),
                      scheduler=fusediff.EulerDiscreteScheduler).eval()
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    ours = sampler({"noise": noise}, num_inference_steps=6)
    # the loop by hand
    euler = fusediff.EulerDiscreteScheduler.from_config(source.config)
    euler.set_timesteps(6)
    x = noise * euler.init_noise_sigma
    with torch.no_grad():
        for t in euler.timesteps:
            x = euler.step(unet(euler.scale_model_input(x, t), t).sample, t, x).prev_sample
    assert_close(ours, x, "Euler loop", rtol=1e-6)


def test_cfg_sampler_is_seeded_and_guided_sampling_runs():
    unet = _unet(seed=10, num_class_embeds=4)
    model = ClassifierFreeGuidance(ClassConditioning(unet, 3), drop_prob=0.5, guidance_scale=3.0)
    sampler = Sampler(model, Predictor("epsilon"), Schedule.from_scheduler(fusediff.DDPMScheduler())).train()
    batch = {**_batch(), "class_labels": torch.tensor([0, 1, 2, 0])}
    first = sampler(batch, generator=torch.Generator().manual_seed(11))
    again = sampler(batch, generator=torch.Generator().manual_seed(11))
    assert torch.equal(first, again)
    out = sampler.sample(2, (3, 8, 8), generator=torch.Generator().manual_seed(12), num_inference_steps=3,
                         class_labels=torch.tensor([1, 2]))
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()
    assert sampler.training and model.training, "sampling restores the training mode"


def test_thirty_steps_lower_the_loss():
    torch.manual_seed(13)
    unet = UNet2DModel(**TINY_UNET)
    sampler = Sampler(UNetAdapter(unet), Predictor("epsilon"), Schedule.from_scheduler(fusediff.DDPMScheduler()))
    g = torch.Generator().manual_seed(14)
    x0 = torch.linspace(-1, 1, 8).expand(4, 3, 8, 8).contiguous()  # a fixed toy batch: ramps
    batch = {"sample": x0, "noise": torch.randn(4, 3, 8, 8, generator=g),
             "timesteps": torch.tensor([10, 200, 500, 900])}
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss = sampler(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print("loss", losses[0], "->", losses[-1])
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("backend", ["eager"])
def test_compiled_train_forward(backend):
    torch._dynamo.reset()
    unet = _unet(seed=15)
    sampler = Sampler(UNetAdapter(unet), Predictor("v_prediction"), Schedule.from_scheduler(fusediff.DDPMScheduler()),
                      loss_weighting="min_snr")
    compiled = torch.compile(sampler, fullgraph=True, backend=backend)
    batch = {**_batch(), "noise": torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(16)),
             "timesteps": torch.tensor([3, 300, 600, 999])}
    ours = compiled(batch)
    expected = sampler(batch)
    assert_close(ours.detach(), expected.detach(), "compiled loss", rtol=1e-5)
    ours.backward()
    assert all(p.grad is not None for p in unet.parameters())
    drawn = compiled(_batch())  # noise and timesteps drawn inside the graph from the global RNG
    assert drawn.dim() == 0 and torch.isfinite(drawn)


def test_bad_input():
    unet = _unet()
    schedule = Schedule.from_scheduler(fusediff.DDPMScheduler())
    with pytest.raises(ValueError, match="loss_weighting"):
        Sampler(UNetAdapter(unet), Predictor(), schedule, loss_weighting="snr")
    with pytest.raises(ValueError, match="timestep_sampling"):
        Sampler(UNetAdapter(unet), Predictor(), schedule, timestep_sampling="cosine")
    with pytest.raises(TypeError, match="predictor"):
        Sampler(UNetAdapter(unet), "epsilon", schedule)
    with pytest.raises(ValueError, match="predicts"):
        Sampler(UNetAdapter(unet), Predictor("v_prediction"), schedule, scheduler=fusediff.DDIMScheduler())
    sampler = Sampler(UNetAdapter(unet), Predictor(), schedule)
    with pytest.raises(ValueError, match="'sample'"):
        sampler({"x": torch.zeros(1)})
    with pytest.raises(ValueError, match="'noise'"):
        sampler.eval()({"sample": torch.zeros(1, 3, 8, 8)})
