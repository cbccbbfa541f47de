"""StableDiffusionImg2ImgPipeline against HF diffusers, loaded from a text-to-image directory: image inputs
of every kind, strength -> start step, one generator or one per image."""

from __future__ import annotations

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from pipelines.tiny_sd import assert_same_images, build_sd

from fusediff import StableDiffusionImg2ImgPipeline
from fusediff.pipelines import text_conditioning as tc

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (38, 42, 3), dtype=np.uint8)  # not a multiple of the VAE factor 4
CALL = dict(prompt=["a red cat", "a dog"], negative_prompt=["blurry", ""], strength=0.6, num_inference_steps=5,
            guidance_scale=6.0, eta=0.5, output_type="np")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """name -> (fusediff, diffusers) img2img pipelines loaded from a text-to-image directory."""
    root, built = tmp_path_factory.mktemp("img2img"), {}

    def get(name: str = "ddim"):
        if name not in built:
            build_sd(root / name, name)
            ours = StableDiffusionImg2ImgPipeline.from_pretrained(root / name)
            theirs = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(root / name)
            for pipe in (ours, theirs):
                pipe.set_progress_bar_config(disable=True)
            built[name] = ours, theirs
        return built[name]
    return get


def _gens(n: int = 2):
    return [torch.Generator().manual_seed(10 + i) for i in range(n)]


@pytest.mark.parametrize("name", ["ddim", "euler_a", "heun", "dpmpp_2m_karras"])
def test_same_images_as_diffusers(pipes, name):
    ours, theirs = pipes(name)
    image = PIL.Image.fromarray(PIXELS)
    images = ours(image=image, generator=_gens(), **CALL).images
    assert images.shape == (2, 36, 40, 3)  # floored to multiples of 4
    assert_same_images(images, theirs(image=image, generator=_gens(), **CALL).images)
    one = torch.Generator().manual_seed(3)
    assert_same_images(ours(image=[image, image], generator=one, **CALL).images,
                       theirs(image=[image, image], generator=torch.Generator().manual_seed(3), **CALL).images)


@pytest.mark.parametrize("kind", ["numpy", "numpy-batch", "torch", "torch-batch", "latents"])
def test_image_inputs(pipes, kind):
    ours, theirs = pipes("ddim")
    array = PIXELS[:32, :32].astype(np.float32) / 255
    image = {"numpy": array, "numpy-batch": np.stack([array, array[::-1]]),
             "torch": torch.from_numpy(array).permute(2, 0, 1),
             "torch-batch": torch.from_numpy(np.stack([array, array[:, ::-1]])).permute(0, 3, 1, 2),
             "latents": torch.from_numpy(RNG.standard_normal((1, 4, 8, 8)).astype(np.float32))}[kind]
    assert_same_images(ours(image=image, generator=_gens(), **CALL).images,
                       theirs(image=image, generator=_gens(), **CALL).images)


@pytest.mark.parametrize("steps, strength, expected", [(10, 0.3, 3), (10, 1.0, 10), (4, 0.55, 2)])
def test_strength_picks_the_last_steps(pipes, steps, strength, expected):
    ours, _ = pipes("ddim")
    seen = []
    ours("a cat", image=PIL.Image.fromarray(PIXELS), strength=strength, num_inference_steps=steps,
         output_type="latent", callback_on_step_end=lambda p, i, t, kw: seen.append(int(t)) or {})
    ours.scheduler.set_timesteps(steps)
    assert seen == ours.scheduler.timesteps[steps - expected:].tolist()


def test_preprocess_matches_diffusers_image_processor():
    processor = diffusers.image_processor.VaeImageProcessor(vae_scale_factor=4)
    image = PIL.Image.fromarray(PIXELS)
    for ours, theirs in [(tc.preprocess_image(image, multiple=4), processor.preprocess(image)),
                         (tc.preprocess_image(image, 24, 16, multiple=4), processor.preprocess(image, 24, 16))]:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(strength=1.5), "strength"),
    (dict(strength=0.05, num_inference_steps=10), "no step"),
    (dict(image=None), "needs an image"),
    (dict(image="cat.png"), "PIL image"),
    (dict(prompt=["a", "b", "c"], image=[PIL.Image.fromarray(PIXELS)] * 2), "cannot spread"),
])
def test_bad_arguments(pipes, kwargs, message):
    ours, _ = pipes("ddim")
    call = dict(prompt="a cat", image=PIL.Image.fromarray(PIXELS), num_inference_steps=2, output_type="latent")
    with pytest.raises(ValueError, match=message):
        ours(**{**call, **kwargs})
