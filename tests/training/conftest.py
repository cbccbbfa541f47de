"""Shared pieces of the trainer tests: factories of a tiny UNet Sampler and of a few digits (as fixtures),
and one CPU thread per test."""

from __future__ import annotations

import pytest
import torch

from fusediff import DDPMScheduler, UNet2DModel

TINY_UNET = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups=4, attention_head_dim=8)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tests' tiny models run faster than with threads fighting over shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _make_sampler(seed: int = 0, conditional: bool = False, drop_prob: float = 0.1):
    """(unet, sampler): a tiny UNet2DModel (seeded) in a Sampler with the epsilon objective; class-conditional
    with classifier-free guidance (null label 10) when ``conditional``."""
    from fusediff.training import (ClassConditioning, ClassifierFreeGuidance, Predictor, Sampler, Schedule,
                                   UNetAdapter)

    torch.manual_seed(seed)
    unet = UNet2DModel(**TINY_UNET, **({"num_class_embeds": 11} if conditional else {}))
    if conditional:
        model = ClassifierFreeGuidance(ClassConditioning(unet, num_classes=10), drop_prob=drop_prob,
                                       null_cond={"class_labels": 10})
    else:
        model = UNetAdapter(unet)
    schedule = Schedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"))
    return unet, Sampler(model, Predictor("epsilon"), schedule)


def _digits(n: int, labels: bool = False, fixed_noise: bool = False) -> dict[str, torch.Tensor]:
    """The first ``n`` digits at 8x8 as a data dict; with ``fixed_noise`` each item also carries its own
    noise and timestep, so its loss is a deterministic function of the weights."""
    from fusediff.training.digits import load_digits_images

    images, y = load_digits_images(8)
    data = {"sample": images[:n]}
    if labels:
        data["class_labels"] = y[:n]
    if fixed_noise:
        g = torch.Generator().manual_seed(1234)
        data["noise"] = torch.randn(n, 1, 8, 8, generator=g)
        data["timesteps"] = torch.randint(0, 1000, (n,), generator=g)
    return data


@pytest.fixture
def make_sampler():
    """The factory :func:`_make_sampler`."""
    return _make_sampler


@pytest.fixture
def digits():
    """The factory :func:`_digits`."""
    return _digits
