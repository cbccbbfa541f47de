"""StableDiffusionInpaintPipeline against HF diffusers: the 9-channel inpainting UNet, and a plain 4-channel
UNet (diffusers' legacy masked blend) loaded from a text-to-image directory; strength below and at 1."""

from __future__ import annotations

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from pipelines.tiny_sd import SIZE, assert_same_images, build_sd

import fusediff
from fusediff import StableDiffusionInpaintPipeline
from fusediff.pipelines import text_conditioning as tc

RNG = np.random.default_rng(1)
IMAGE = PIL.Image.fromarray(RNG.integers(0, 256, (40, 36, 3), dtype=np.uint8))  # resized to 32 x 32
MASK = np.zeros((SIZE, SIZE), np.float32)
MASK[8:24, 4:20] = 1.0  # repaint a rectangle
CALL = dict(prompt=["a red cat", "a dog"], negative_prompt=["blurry", ""], num_inference_steps=4,
            guidance_scale=6.0, output_type="np")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(channels, scheduler) -> (fusediff, diffusers) inpainting pipelines; 4 channels from a text-to-image dir."""
    root, built = tmp_path_factory.mktemp("inpaint"), {}

    def get(channels: int, name: str = "ddim"):
        if (channels, name) not in built:
            directory = root / f"{channels}-{name}"
            pipeline = "StableDiffusionInpaintPipeline" if channels == 9 else "StableDiffusionPipeline"
            build_sd(directory, name, pipeline=pipeline, unet_in_channels=channels)
            ours = StableDiffusionInpaintPipeline.from_pretrained(directory)
            theirs = diffusers.StableDiffusionInpaintPipeline.from_pretrained(directory)
            for pipe in (ours, theirs):
                pipe.set_progress_bar_config(disable=True)
            built[channels, name] = ours, theirs
        return built[channels, name]
    return get


def _gens():
    return [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]


@pytest.mark.parametrize("channels", [9, 4])
@pytest.mark.parametrize("name", ["ddim", "euler"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_same_images_as_diffusers(pipes, channels, name, strength):
    ours, theirs = pipes(channels, name)
    assert ours.unet.config.in_channels == channels
    mask = PIL.Image.fromarray((MASK * 255).astype(np.uint8))
    call = dict(CALL, image=IMAGE, mask_image=mask, strength=strength)
    assert_same_images(ours(generator=_gens(), **call).images, theirs(generator=_gens(), **call).images)


@pytest.mark.parametrize("mask_kind", ["numpy", "torch"])
def test_mask_inputs_and_one_generator(pipes, mask_kind):
    ours, theirs = pipes(9)
    mask = MASK if mask_kind == "numpy" else torch.from_numpy(MASK)[None]
    call = dict(CALL, image=IMAGE, mask_image=mask, strength=0.8, num_images_per_prompt=2)
    assert_same_images(ours(generator=torch.Generator().manual_seed(5), **call).images,
                       theirs(generator=torch.Generator().manual_seed(5), **call).images)


def test_four_channel_blend_keeps_the_unmasked_latents(pipes):
    """With nothing masked the 4-channel blend returns the image's latents (its first random draw)."""
    ours, _ = pipes(4)
    out = ours("a cat", image=IMAGE, mask_image=np.zeros((SIZE, SIZE), np.float32), num_inference_steps=3,
               output_type="latent", generator=torch.Generator().manual_seed(4)).images
    pixels = tc.preprocess_image(IMAGE, SIZE, SIZE, multiple=4)
    expected = tc.encode_image(ours.vae, pixels, torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_inpaint_from_inpaint_directory_via_diffusion_pipeline(pipes, tmp_path):
    ours, _ = pipes(9)
    ours.save_pretrained(tmp_path)
    loaded = fusediff.DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is StableDiffusionInpaintPipeline and loaded.unet.config.in_channels == 9


def test_bad_arguments(pipes):
    ours, _ = pipes(9)
    call = dict(prompt="a cat", image=IMAGE, mask_image=MASK, num_inference_steps=2, output_type="latent")
    with pytest.raises(ValueError, match="strength"):
        ours(**call, strength=-0.1)
    with pytest.raises(ValueError, match="mask_image"):
        ours(**{**call, "mask_image": None})
    with pytest.raises(ValueError, match="multiple of 8"):
        ours(**call, height=20)
    unet = diffusers.UNet2DConditionModel(**{**ours.unet.config, "in_channels": 5})
    odd = StableDiffusionInpaintPipeline(**{**ours.components, "unet": unet}, requires_safety_checker=False)
    with pytest.raises(ValueError, match="takes 5 channels"):
        odd(**call)
