"""DeepFloyd IF pipelines: input images read as diffusers reads them, bad input, and the deliberate differences
from diffusers 0.42.1 that the pipeline modules' docstrings list (each pinned here)."""

from __future__ import annotations

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from pipelines.tiny_if import LOW, SIZE, build_if

import fusediff
from fusediff import DiffusionPipeline
from fusediff.pipelines.pipeline_if_images import if_image_tensor


def _seed(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """name -> (fusediff pipeline, diffusers pipeline), built once."""
    root, built = tmp_path_factory.mktemp("if-inputs"), {}

    def get(name: str):
        if name not in built:
            theirs = build_if(root / name, name)
            ours = DiffusionPipeline.from_pretrained(root / name)
            ours.set_progress_bar_config(disable=True)
            built[name] = ours, theirs
        return built[name]
    return get


def _pil(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# -- images read as diffusers reads them -------------------------------------------------------
@pytest.mark.parametrize("size", [(48, 32), (32, 52), (32, 32)], ids=["wide", "tall", "square"])
def test_img2img_pil_images_are_resized_as_in_diffusers(pipes, size):
    ours, theirs = pipes("IFImg2ImgPipeline")
    images = [_pil(*size, seed=0), _pil(*size, seed=1)]
    expected = theirs.preprocess_image(images)
    mine = if_image_tensor(images, resize_to=ours.default_size()[0])
    assert mine.shape == expected.shape and torch.equal(mine, expected)


@pytest.mark.parametrize("kind", ["pil", "numpy", "tensor", "tensor_list"])
def test_super_resolution_images_are_read_as_in_diffusers(pipes, kind):
    ours, theirs = pipes("IFSuperResolutionPipeline")
    pil = [_pil(LOW, LOW, seed=0), _pil(LOW, LOW, seed=1)]
    arrays = np.stack([np.asarray(p, np.float32) / 127.5 - 1 for p in pil])
    image = {"pil": pil, "numpy": arrays, "tensor": torch.from_numpy(arrays).permute(0, 3, 1, 2),
             "tensor_list": list(torch.from_numpy(arrays).permute(0, 3, 1, 2))}[kind]
    expected = theirs.preprocess_image(image, 1, "cpu")
    assert torch.equal(if_image_tensor(image), expected)


def test_pil_image_for_img2img_runs_as_in_diffusers(pipes):
    ours, theirs = pipes("IFImg2ImgPipeline")
    call = dict(prompt="a cat", image=_pil(40, 32), num_inference_steps=4, strength=0.8, guidance_scale=1.0,
                output_type="np")
    mine = ours(generator=_seed(), **call).images
    expected = theirs(generator=_seed(), clean_caption=False, **call).images
    assert mine.shape == (1, SIZE, 40, 3)
    assert np.abs(mine - expected).max() <= 1e-4, np.abs(mine - expected).max()


# -- deliberate differences ----------------------------------------------------------------------
def test_clean_caption_is_off_by_default_and_true_raises(pipes):
    ours, _ = pipes("IFPipeline")
    with pytest.raises(NotImplementedError, match="clean_caption"):
        ours("a cat", num_inference_steps=1, clean_caption=True)
    with pytest.raises(NotImplementedError, match="clean_caption"):
        ours.encode_prompt("a cat", clean_caption=True)
    # diffusers without bs4/ftfy falls back to the same lower-cased, stripped texts
    _, theirs = pipes("IFPipeline")
    assert torch.equal(ours.encode_prompt("  A Cat ")[0], theirs.encode_prompt("a cat", clean_caption=False)[0])


def test_a_lone_chw_tensor_is_one_image():
    image = torch.rand(3, LOW, LOW) * 2 - 1
    assert torch.equal(if_image_tensor(image), image[None])


def test_a_list_of_4d_arrays_is_concatenated():
    """diffusers' super resolution keeps only the first array of such a list; fusediff takes them all."""
    arrays = [np.zeros((1, LOW, LOW, 3), np.float32), np.ones((2, LOW, LOW, 3), np.float32)]
    assert if_image_tensor(arrays).shape == (3, 3, LOW, LOW)


def test_a_swapped_in_ddim_gets_the_eps_channels(pipes):
    """diffusers passes DDIM the variance channels too (its config keeps IF's variance_type) and fails."""
    ours, theirs = pipes("IFPipeline")
    call = dict(prompt="a cat", num_inference_steps=2, guidance_scale=3.0, output_type="np")
    ours.scheduler = fusediff.DDIMScheduler.from_config(ours.scheduler.config)
    assert ours.scheduler.config.variance_type == "learned_range"
    try:
        image = ours(generator=_seed(), **call).images
    finally:
        ours.scheduler = fusediff.DDPMScheduler.from_config(ours.scheduler.config)
    assert image.shape == (1, SIZE, SIZE, 3) and np.isfinite(image).all()
    reference = diffusers.IFPipeline(**{**theirs.components,
                                        "scheduler": diffusers.DDIMScheduler.from_config(theirs.scheduler.config)})
    reference.set_progress_bar_config(disable=True)
    with pytest.raises(RuntimeError):
        reference(generator=_seed(), clean_caption=False, **call)


def test_super_resolution_scales_only_the_noisy_sample():
    """``scale_model_input`` gets x_t alone; the upsampled image reaches the UNet as it was noised."""
    from fusediff.pipelines.pipeline_if import if_unet_prediction

    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states, class_labels=None):
            seen["x"] = x
            return type("Out", (), {"sample": torch.zeros(x.shape[0], 6, *x.shape[2:])})()

    x, upscaled = torch.full((1, 3, 4, 4), 2.0), torch.full((1, 3, 4, 4), 5.0)
    if_unet_prediction(Spy(), x, torch.tensor(1), torch.zeros(1, 2, 8), torch.tensor([3]), upscaled,
                       channels=3, guided=False, learned_variance=True)
    assert torch.equal(seen["x"], torch.cat([x, upscaled], dim=1))


# -- bad input -------------------------------------------------------------------------------------
CHEAP = dict(num_inference_steps=1)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(height=SIZE + 1), ValueError, "height must be a positive multiple of 2"),
    (dict(width=0), ValueError, "width must be a positive multiple"),
    (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt"),
    (dict(output_type="latent"), ValueError, "output_type"),
    (dict(prompt=None), ValueError, "prompt"),
    (dict(prompt=3), ValueError, "prompt must be a str"),
    (dict(prompt=["a cat"], negative_prompt=["a", "b"], guidance_scale=2.0), ValueError, "2 negative prompts for 1"),
    (dict(negative_prompt=["a"], guidance_scale=2.0), TypeError, "negative_prompt must have prompt's type"),
    (dict(callback_steps=0, callback=print), ValueError, "callback_steps"),
    (dict(callback=print, callback_on_step_end=lambda *a: {}), ValueError, "not both"),
    (dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["upscaled"]), ValueError,
     "callback_on_step_end_tensor_inputs"),
    (dict(generator=[_seed(), _seed()]), ValueError, "2 generators for 1"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
])
def test_stage_one_bad_input(pipes, kwargs, error, match):
    ours, _ = pipes("IFPipeline")
    with pytest.raises(error, match=match):
        ours(**{"prompt": "a cat", **CHEAP, **kwargs})


@pytest.mark.parametrize("image, kwargs, error, match", [
    (None, {}, ValueError, "needs an image"),
    ("a path", {}, TypeError, "PIL image, numpy array or torch tensor"),
    ([torch.zeros(3, 8, 8), np.zeros((8, 8, 3), np.float32)], {}, TypeError, "list of one of these"),
    (torch.zeros(1, 4, SIZE, SIZE), {}, ValueError, "4 channels"),
    (torch.zeros(1, 3, SIZE + 1, SIZE), {}, ValueError, "multiples of 2"),
    (torch.zeros(2, 3, SIZE, SIZE), {}, ValueError, "2 images for 1 prompts"),
    (torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8), {}, TypeError, "floats in"),
    (torch.zeros(1, 1, 3, SIZE, SIZE), {}, ValueError, "3-D or all 4-D"),
    (torch.zeros(1, 3, SIZE, SIZE), dict(strength=1.5), ValueError, "strength"),
])
def test_img2img_bad_input(pipes, image, kwargs, error, match):
    ours, _ = pipes("IFImg2ImgPipeline")
    with pytest.raises(error, match=match):
        ours("a cat", image=image, **CHEAP, **kwargs)


@pytest.mark.parametrize("image, kwargs, error, match", [
    (None, {}, ValueError, "low-resolution image"),
    (torch.zeros(1, 6, LOW, LOW), {}, ValueError, "6 channels"),
    (torch.zeros(1, 3, LOW, LOW), dict(noise_level=1000), ValueError, r"noise_level .* \[0, 1000\)"),
    (torch.zeros(1, 3, LOW, LOW), dict(noise_level=2.5), ValueError, "noise_level"),
    (torch.zeros(1, 3, LOW, LOW), dict(height=SIZE + 1), ValueError, "height"),
    ([_pil(LOW, LOW), _pil(LOW + 8, LOW)], {}, ValueError, "different sizes"),
])
def test_super_resolution_bad_input(pipes, image, kwargs, error, match):
    ours, _ = pipes("IFSuperResolutionPipeline")
    with pytest.raises(error, match=match):
        ours("a cat", image=image, **CHEAP, **kwargs)


def test_super_resolution_warns_for_a_stage_one_unet(pipes, caplog):
    stage_one, _ = pipes("IFPipeline")
    sr, _ = pipes("IFSuperResolutionPipeline")
    type(sr)(**{**sr.components, "unet": stage_one.unet}, requires_safety_checker=False)
    assert "takes 3 input channels" in caplog.text


def test_diffusers_and_fusediff_accept_the_same_call_order(pipes):
    """Positional arguments follow diffusers' order (prompt, steps, timesteps, guidance, negative prompt, ...)."""
    import inspect

    for name in ("IFPipeline", "IFImg2ImgPipeline", "IFSuperResolutionPipeline"):
        ours = list(inspect.signature(getattr(__import__("fusediff"), name).__call__).parameters)
        theirs = list(inspect.signature(getattr(diffusers, name).__call__).parameters)
        common = [p for p in theirs if p in ours]
        assert [p for p in ours if p in common] == common, name
        assert set(theirs) - set(ours) <= {"cross_attention_kwargs"}, name
