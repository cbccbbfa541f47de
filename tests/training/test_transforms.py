"""Dict-batch transforms against hand formulas: normalisation, per-item flips and crops (each crop found
back in its padded image by exhaustive search), VAE encoding against the VAE called directly, AddNoise
against diffusers' add_noise; inputs left unchanged; and one compiled graph for the tensor-only ones."""

from __future__ import annotations

import diffusers
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusediff import AutoencoderKL
from fusediff.training import AddNoise, Normalize, RandomCrop, RandomHorizontalFlip, Schedule, VAEEncode
from support.configs import TINY_AUTOENCODER
from support.parity import assert_close, one_thread  # noqa: F401  (one_thread: autouse)


def _images(b=6, c=3, h=8, w=10, seed=0):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_normalize():
    x = _images()
    batch = {"sample": x, "class_labels": torch.arange(6)}
    out = Normalize([0.5, 0.4, 0.3], [0.5, 0.25, 2.0])(batch)
    expected = (x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    assert_close(out["sample"], expected, "per-channel", rtol=1e-6)
    assert out["class_labels"] is batch["class_labels"] and batch["sample"] is x, "input dict unchanged"
    assert_close(Normalize(0.5, 0.5)(batch)["sample"], x * 2 - 1, "[0, 1] -> [-1, 1]", rtol=1e-6)
    with pytest.raises(ValueError, match="std"):
        Normalize(0.5, 0.0)
    with pytest.raises(ValueError, match="no tensor 'image'"):
        Normalize(0.5, 0.5, key="image")(batch)


def test_flip_per_item_and_shared_by_keys():
    x, mask = _images(b=64), _images(b=64, c=1, seed=1)
    batch = {"sample": x, "mask": mask}
    out = RandomHorizontalFlip(0.5, keys=("sample", "mask"))(batch, generator=torch.Generator().manual_seed(2))
    flipped = (out["sample"] == x.flip(-1)).all(dim=(1, 2, 3))
    kept = (out["sample"] == x).all(dim=(1, 2, 3))
    assert torch.equal(flipped, ~kept), "each item flipped or not"
    assert torch.equal(flipped, (out["mask"] == mask.flip(-1)).all(dim=(1, 2, 3))), "same flips for every key"
    assert torch.equal(flipped, torch.rand(64, generator=torch.Generator().manual_seed(2)) < 0.5)
    assert 16 < int(flipped.sum()) < 48
    assert torch.equal(RandomHorizontalFlip(1.0)(batch)["sample"], x.flip(-1))
    assert torch.equal(RandomHorizontalFlip(0.0)(batch)["sample"], x)
    assert batch["sample"] is x
    with pytest.raises(ValueError, match="p must"):
        RandomHorizontalFlip(1.5)
    with pytest.raises(ValueError, match="4-D"):
        RandomHorizontalFlip()({"sample": torch.zeros(3, 4)})


def _find_offsets(crop, padded):
    """All (top, left) where ``crop`` (C, h, w) occurs in ``padded`` (C, H, W)."""
    h, w = crop.shape[1:]
    return [(i, j) for i in range(padded.shape[1] - h + 1) for j in range(padded.shape[2] - w + 1)
            if torch.equal(padded[:, i:i + h, j:j + w], crop)]


@pytest.mark.parametrize("padding", [0, 2])
def test_crop_per_item(padding):
    x, other = _images(b=12), _images(b=12, c=2, seed=3)
    out = RandomCrop((5, 6), keys=("sample", "other"), padding=padding)({"sample": x, "other": other},
                                                                         generator=torch.Generator().manual_seed(4))
    assert out["sample"].shape == (12, 3, 5, 6) and out["other"].shape == (12, 2, 5, 6)
    offsets = []
    for b in range(12):
        found = _find_offsets(out["sample"][b], F.pad(x[b], (padding,) * 4))
        assert len(found) == 1, f"item {b}: crop found at {found}"
        top, left = found[0]
        padded_other = F.pad(other[b], (padding,) * 4)
        assert torch.equal(out["other"][b], padded_other[:, top:top + 5, left:left + 6]), "same window for every key"
        offsets.append(found[0])
    assert len(set(offsets)) > 3, f"offsets vary per item: {offsets}"
    full = RandomCrop((8, 10))({"sample": x})
    assert torch.equal(full["sample"], x)
    with pytest.raises(ValueError, match="larger"):
        RandomCrop(11)({"sample": x})


def test_vae_encode():
    torch.manual_seed(5)
    vae = AutoencoderKL(**TINY_AUTOENCODER).eval()
    x = _images(b=2, h=8, w=8) * 2 - 1
    ours = VAEEncode(vae)({"sample": x}, generator=torch.Generator().manual_seed(6))["sample"]
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        expected = dist.sample(generator=torch.Generator().manual_seed(6)) * vae.config.scaling_factor
        mode = dist.mode() * 0.5
    assert not ours.requires_grad
    assert_close(ours, expected, "sampled latents", rtol=1e-6)
    assert_close(VAEEncode(vae, scaling_factor=0.5, sample_posterior=False)({"sample": x})["sample"], mode,
                 "mode latents", rtol=1e-6)
    with pytest.raises(TypeError, match="encode"):
        VAEEncode(nn.Identity())


def test_add_noise_matches_diffusers():
    theirs = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    x0 = _images() * 2 - 1
    out = AddNoise(Schedule.from_scheduler(theirs))({"sample": x0}, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (6,), generator=g)
    assert torch.equal(out["noise"], noise) and torch.equal(out["timesteps"], t)
    assert_close(out["noisy"], theirs.add_noise(x0, noise, t), "noisy", rtol=1e-6)
    assert out["sample"] is x0
    with pytest.raises(ValueError, match="timestep_sampling"):
        AddNoise(Schedule.from_scheduler(theirs), timestep_sampling="cosine")


def test_compiled_pipeline_of_transforms():
    torch._dynamo.reset()
    schedule = Schedule.from_scheduler(diffusers.DDPMScheduler())
    x = _images(b=4, h=8, w=8)
    deterministic = nn.Sequential(Normalize(0.5, 0.5), RandomHorizontalFlip(1.0), RandomCrop(8), AddNoise(schedule))
    compiled = torch.compile(deterministic, fullgraph=True)
    out = compiled({"sample": x})
    # flips and crops are deterministic here; the noise is whatever the graph drew
    x0 = (x * 2 - 1).flip(-1)
    assert_close(out["sample"], x0, "compiled transforms", rtol=1e-6)
    assert_close(out["noisy"], schedule.add_noise(x0, out["noise"], out["timesteps"]), "compiled noisy", rtol=1e-5)
    assert out["timesteps"].dtype == torch.int64 and 0 <= int(out["timesteps"].min()) < 1000
    random = torch.compile(nn.Sequential(RandomHorizontalFlip(0.5), RandomCrop(6, padding=1)), fullgraph=True)
    cropped = random({"sample": x})["sample"]
    assert cropped.shape == (4, 3, 6, 6)
    for b in range(4):
        found = [*_find_offsets(cropped[b], F.pad(x[b], (1,) * 4)),
                 *_find_offsets(cropped[b], F.pad(x[b].flip(-1), (1,) * 4))]
        assert found, f"compiled crop {b} is a window of the (flipped) padded image"
