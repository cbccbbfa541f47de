"""The shipped digits model: small enough, loads as a pipeline, and its samples are recognisable digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from digits_data import confident_digits, fit_classifier, load_digits_images

from fusediff import DDIMPipeline, DDPMPipeline, DiffusionPipeline
from fusediff.cli import DIGITS_MODEL, main

MAX_BYTES = 10 * 1024 * 1024
NUM_SAMPLES = 256


@pytest.fixture(scope="module")
def classifier():
    clf, accuracy, held_out = fit_classifier()
    return clf, accuracy, held_out


def test_asset_layout_and_size():
    files = [p for p in DIGITS_MODEL.rglob("*") if p.is_file()]
    names = {str(p.relative_to(DIGITS_MODEL)) for p in files}
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json"} <= names, names
    total = sum(p.stat().st_size for p in files)
    assert total <= MAX_BYTES, f"shipped model is {total / 2**20:.1f} MiB"


def test_loads_as_ddpm_pipeline_of_16px_gray_images():
    pipe = DiffusionPipeline.from_pretrained(DIGITS_MODEL)
    assert isinstance(pipe, DDPMPipeline)
    assert pipe.unet.config.sample_size >= 16 and pipe.unet.config.in_channels == 1


def test_classifier_is_a_fair_judge(classifier):
    """It knows real digits it has not seen, and is not fooled by images that are not digits, also by
    kinds it was not fit to (scrambled, shifted and inverted digits)."""
    clf, accuracy, (x_test, y_test) = classifier
    assert accuracy >= 0.95, accuracy
    labels, confident = confident_digits(clf, torch.from_numpy(x_test).view(-1, 1, 16, 16))
    print(f"held-out real digits: {confident.mean():.3f} confident, {np.mean(labels == y_test):.3f} right")
    assert confident.mean() >= 0.9 and np.mean(labels[confident] == y_test[confident]) >= 0.98
    images, _ = load_digits_images()
    assert images.min() == -1 and images.max() == 1
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(256, 1, 16, 16, generator=g).clamp(-1, 1)
    fakes = {
        "noise": noise,
        "blurred noise": (torch.nn.functional.avg_pool2d(noise, 5, stride=1, padding=2) * 4).clamp(-1, 1),
        "blank": -torch.ones(256, 1, 16, 16),
        "scrambled digits": images[:256].flatten(1)[:, torch.randperm(256, generator=g)].view(256, 1, 16, 16),
        "digits shifted by half": torch.roll(images[:256], shifts=(8, 8), dims=(2, 3)),
        "inverted digits": -images[:256],
    }
    for name, fake in fakes.items():
        _, confident = confident_digits(clf, fake)
        assert confident.mean() < 0.05, f"the classifier labels {confident.mean():.0%} of {name} as digits"


def test_samples_are_recognisable_digits(classifier):
    clf, _, _ = classifier
    base = DiffusionPipeline.from_pretrained(DIGITS_MODEL)
    pipe = DDIMPipeline(unet=base.unet, scheduler=base.scheduler)
    pipe.set_progress_bar_config(disable=True)
    samples = pipe(batch_size=NUM_SAMPLES, num_inference_steps=50, generator=torch.Generator().manual_seed(0),
                   output_type="pt").images
    labels, confident = confident_digits(clf, samples * 2 - 1)
    counts = {d: int((labels[confident] == d).sum()) for d in range(10)}
    print(f"confident: {confident.mean():.3f}; per digit: {counts}")
    assert confident.mean() >= 0.9, f"only {confident.mean():.1%} of samples labelled with confidence; {counts}"
    assert all(c > 0 for c in counts.values()), f"some digits never appear: {counts}"


def test_cli_samples_the_shipped_model_by_default(tmp_path):
    assert main(["sample", "--batch", "2", "--steps", "4", "--quiet", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0
