"""``fusediff sample --prompt``: text-to-image sampling from a tiny diffusers-saved Stable Diffusion (and LDM)
directory, the same image as the Python API, scheduler names, and one-line errors."""

from __future__ import annotations

import PIL.Image
import pytest
import torch
from pipelines.tiny_sd import SIZE, build_ldm, build_sd

from fusediff import DiffusionPipeline
from fusediff.cli import TEXT_SCHEDULERS, main


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli-text") / "sd"
    build_sd(directory, "pndm")
    return directory


@pytest.fixture(scope="module")
def ldm_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli-ldm") / "ldm"
    build_ldm(directory, "ddim")
    return directory


def _sample(model, *args):
    return main(["sample", "--model", str(model), "--steps", "2", "--quiet", *args])


def test_writes_the_api_image(sd_dir, tmp_path):
    assert _sample(sd_dir, "--prompt", "a red cat", "--negative-prompt", "blur", "--guidance", "4",
                   "--seed", "3", "--out-dir", str(tmp_path)) == 0
    written = PIL.Image.open(tmp_path / "sample_0000.png")
    assert written.size == (SIZE, SIZE) and written.mode == "RGB"
    pipe = DiffusionPipeline.from_pretrained(sd_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a red cat", negative_prompt="blur", guidance_scale=4.0, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(3)).images[0]
    assert written.tobytes() == expected.tobytes()


def test_grid_size_and_batch(sd_dir, tmp_path):
    out = tmp_path / "grid.png"
    assert _sample(sd_dir, "--prompt", "a cat", "--batch", "3", "--height", "16", "--width", "24",
                   "--out", str(out)) == 0
    assert PIL.Image.open(out).size == (2 * 26 + 2, 2 * 18 + 2)  # 2 x 2 cells of 24 x 16 px + 2 px gaps


@pytest.mark.parametrize("scheduler", sorted(TEXT_SCHEDULERS))
def test_every_scheduler_name(sd_dir, tmp_path, scheduler):
    assert _sample(sd_dir, "--prompt", "a cat", "--scheduler", scheduler, "--out", str(tmp_path / "g.png")) == 0


def test_ldm_model(ldm_dir, tmp_path):
    assert _sample(ldm_dir, "--prompt", "a cat", "--guidance", "3", "--batch", "2", "--out-dir", str(tmp_path)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample_0000.png", "sample_0001.png"]


@pytest.mark.parametrize("args, status, message", [
    (["--prompt", "a", "--height", "30"], 2, "--height: expected a multiple of 8"),
    (["--prompt", "a", "--guidance", "x"], 2, "invalid float value"),
    (["--prompt", "a", "--scheduler", "dpm++"], 2, "invalid choice"),
    (["--guidance", "3"], 2, "--guidance needs --prompt"),
    (["--scheduler", "heun"], 2, "invalid choice"),
    ([], 1, "pass --prompt"),
])
def test_errors_are_one_line(sd_dir, capsys, args, status, message):
    assert _sample(sd_dir, *args, "--out", "x.png") == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fusediff: error:") and message in err, err


def test_prompt_for_an_unconditional_model_is_one_line(capsys):
    assert main(["sample", "--prompt", "a cat", "--quiet", "--out", "x.png"]) == 1  # the shipped digits model
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "takes no prompt" in err, err


def test_negative_prompt_for_ldm_is_one_line(ldm_dir, capsys):
    assert _sample(ldm_dir, "--prompt", "a", "--negative-prompt", "b", "--out", "x.png") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no negative prompt" in err, err
