"""Pipelines against HF diffusers: same seed, same images; directories saved by one load in the other."""

from __future__ import annotations

import json

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

import fusediff
from fusediff import DDIMPipeline, DDPMPipeline, DiffusionPipeline, PNDMPipeline

UNET = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=8)
CASES = {  # pipeline name: (scheduler name, scheduler config, call arguments)
    "DDPMPipeline": ("DDPMScheduler", dict(num_train_timesteps=100), dict(num_inference_steps=10)),
    "DDIMPipeline": ("DDIMScheduler", dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2"),
                     dict(num_inference_steps=8, eta=0.5)),
    "PNDMPipeline": ("PNDMScheduler", dict(num_train_timesteps=100, skip_prk_steps=True),
                     dict(num_inference_steps=8)),
}
ATOL = 1e-4  # images are in [0, 1]; the fused step and ops round differently from diffusers' eager math


def _diffusers_pipeline(name: str, seed: int = 0):
    scheduler_name, scheduler_config, _ = CASES[name]
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**UNET)
    with torch.no_grad():  # diffusers zero-inits nothing here, but make outputs clearly non-trivial
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    scheduler = getattr(diffusers, scheduler_name)(**scheduler_config)
    pipe = getattr(diffusers, name)(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, name: str, batch_size: int = 2, seed: int = 1, **extra):
    call = dict(CASES[name][2], **extra)
    generator = [torch.Generator().manual_seed(seed + i) for i in range(batch_size)] if batch_size == 3 \
        else torch.Generator().manual_seed(seed)
    return pipe(batch_size=batch_size, generator=generator, output_type="np", **call).images


def _compare(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
    where = np.unravel_index(diff.argmax(), diff.shape)
    assert diff.max() <= ATOL, f"max |diff| {diff.max():.3g} at {where}: ours {ours[where]}, diffusers {theirs[where]}"
    assert theirs.std() > 0.01  # the comparison is not between two constant images


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("batch_size", [2, 3])  # 3: a list of generators, one per image
def test_diffusers_directory_gives_diffusers_images(name, batch_size, tmp_path):
    theirs = _diffusers_pipeline(name)
    theirs.save_pretrained(tmp_path)
    ours = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(ours) is getattr(fusediff, name)
    ours.set_progress_bar_config(disable=True)
    _compare(_images(ours, name, batch_size), _images(theirs, name, batch_size))


@pytest.mark.parametrize("name", list(CASES))
def test_fusediff_directory_loads_in_diffusers(name, tmp_path):
    theirs = _diffusers_pipeline(name)
    theirs.save_pretrained(tmp_path / "src")
    ours = DiffusionPipeline.from_pretrained(tmp_path / "src")
    ours.save_pretrained(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["_class_name"] == name and index["unet"] == ["diffusers", "UNet2DModel"]
    reloaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "ours")
    assert type(reloaded).__name__ == name
    reloaded.set_progress_bar_config(disable=True)
    ours.set_progress_bar_config(disable=True)
    _compare(_images(ours, name), _images(reloaded, name))


def test_ddpm_directory_loads_as_ddim(tmp_path):
    _diffusers_pipeline("DDPMPipeline").save_pretrained(tmp_path)
    pipe = DDIMPipeline.from_pretrained(tmp_path)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.num_train_timesteps == 100


def test_component_override_and_components(tmp_path):
    _diffusers_pipeline("DDIMPipeline").save_pretrained(tmp_path)
    scheduler = fusediff.DDIMScheduler(num_train_timesteps=100, clip_sample=False)
    pipe = DDIMPipeline.from_pretrained(tmp_path, scheduler=scheduler)
    assert pipe.scheduler.config.clip_sample is False
    assert set(pipe.components) == {"unet", "scheduler"}
    with pytest.raises(TypeError, match="unexpected arguments: colour"):
        DDIMPipeline.from_pretrained(tmp_path, colour="red")


@pytest.mark.parametrize("output_type", ["pil", "np", "pt"])
def test_output_types(output_type, tmp_path):
    _diffusers_pipeline("DDIMPipeline").save_pretrained(tmp_path)
    pipe = DDIMPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, num_inference_steps=3, output_type=output_type)
    images = out.images
    assert out[0] is images and pipe(batch_size=1, num_inference_steps=2, output_type=output_type,
                                     return_dict=False)[0] is not None
    if output_type == "pil":
        assert len(images) == 2 and isinstance(images[0], PIL.Image.Image) and images[0].size == (8, 8)
    elif output_type == "np":
        assert images.shape == (2, 8, 8, 3) and images.min() >= 0 and images.max() <= 1
    else:
        assert images.shape == (2, 3, 8, 8) and not images.requires_grad


def test_call_runs_without_autograd(tmp_path):
    _diffusers_pipeline("DDPMPipeline").save_pretrained(tmp_path)
    pipe = DDPMPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    pipe.unet.register_forward_hook(lambda *args: seen.append(torch.is_grad_enabled()))
    pipe(batch_size=1, num_inference_steps=2, output_type="pt")
    assert seen == [False, False]


def test_progress_bar_config(tmp_path, capsys):
    _diffusers_pipeline("PNDMPipeline").save_pretrained(tmp_path)
    pipe = PNDMPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(desc="sampling-digits", disable=False)
    pipe(num_inference_steps=3, output_type="np")
    assert "sampling-digits" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    pipe(num_inference_steps=3, output_type="np")
    assert capsys.readouterr().err == ""


def test_to_dtype_and_device(tmp_path):
    _diffusers_pipeline("DDIMPipeline").save_pretrained(tmp_path)
    pipe = DDIMPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.dtype == torch.bfloat16
    assert pipe.to(torch.float32) is pipe and pipe.unet.dtype == torch.float32
    assert pipe.to("cpu", dtype=torch.float64).unet.dtype == torch.float64
    assert pipe.device == torch.device("cpu")
    with pytest.raises(TypeError):
        pipe.to(torch.int32)
    with pytest.raises(TypeError):
        pipe.to(3)
    pipe.to(torch.bfloat16).set_progress_bar_config(disable=True)
    assert pipe(num_inference_steps=2, output_type="pt").images.dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(output_type="jpg"), "output_type"),
    (dict(batch_size=2, generator=[torch.Generator()]), "generators"),
])
def test_bad_call_arguments(kwargs, message, tmp_path):
    _diffusers_pipeline("DDIMPipeline").save_pretrained(tmp_path)
    pipe = DDIMPipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)
