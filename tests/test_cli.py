"""The fusediff command: sampling to a grid or a directory, info, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import PIL.Image
import pytest
import torch

from fusediff import DDPMPipeline, DDPMScheduler, UNet2DModel
from fusediff.cli import main

UNET = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("cli") / "tiny"
    DDPMPipeline(unet=UNet2DModel(**UNET), scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(directory)
    return directory


def _sample(model_dir, *args):
    return main(["sample", "--model", str(model_dir), "--steps", "4", "--quiet", *args])


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "pndm"])
def test_grid(model_dir, tmp_path, scheduler):
    out = tmp_path / "grid.png"
    assert _sample(model_dir, "--scheduler", scheduler, "--batch", "5", "--out", str(out)) == 0
    grid = PIL.Image.open(out)
    assert grid.size == (3 * 10 + 2, 2 * 10 + 2) and grid.mode == "L"  # 3 x 2 cells of 8 px + 2 px gaps


def test_out_dir_and_seed(model_dir, tmp_path):
    assert _sample(model_dir, "--batch", "3", "--seed", "7", "--out-dir", str(tmp_path / "a")) == 0
    assert _sample(model_dir, "--batch", "3", "--seed", "7", "--out-dir", str(tmp_path / "b")) == 0
    assert _sample(model_dir, "--batch", "3", "--seed", "8", "--out-dir", str(tmp_path / "c")) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["sample_0000.png", "sample_0001.png", "sample_0002.png"]
    pixels = {d: [PIL.Image.open(tmp_path / d / n).tobytes() for n in names] for d in "abc"}
    assert pixels["a"] == pixels["b"] and pixels["a"] != pixels["c"]
    assert PIL.Image.open(tmp_path / "a" / names[0]).size == (8, 8)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_low_precision(model_dir, tmp_path, dtype):
    assert _sample(model_dir, "--dtype", dtype, "--batch", "2", "--out", str(tmp_path / "g.png")) == 0


@pytest.mark.parametrize("args, status, message", [
    (["sample", "--out", "x.png", "--steps", "0"], 2, "positive integer"),
    (["sample", "--out", "x.png", "--scheduler", "euler"], 2, "invalid choice"),
    (["sample"], 2, "--out --out-dir is required"),
    (["sample", "--out", "a.png", "--out-dir", "d"], 2, "not allowed with"),
    (["sample", "--out", "x.jpg"], 1, "must name a .png"),
    (["sample", "--out", "x.png", "--model", "/no/such/model"], 1, "cannot load model"),
    (["bogus"], 2, "invalid choice"),
])
def test_errors_are_one_line(args, status, message, capsys):
    assert main(args) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fusediff: error:") and message in err, err


def test_too_many_steps_is_one_line(model_dir, capsys, tmp_path):
    assert main(["sample", "--model", str(model_dir), "--scheduler", "ddim", "--steps", "500", "--quiet",
                 "--out", str(tmp_path / "g.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "500" in err, err


def test_too_few_pndm_steps_is_one_line(model_dir, capsys, tmp_path):
    """PNDM's Runge-Kutta warm-up needs 4 timesteps; diffusers fails there with a broadcasting error."""
    assert main(["sample", "--model", str(model_dir), "--scheduler", "pndm", "--steps", "3", "--quiet",
                 "--out", str(tmp_path / "g.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "at least 4" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_missing_is_one_line(capsys, model_dir):
    assert _sample(model_dir, "--device", "cuda", "--out", "x.png") == 1
    assert "no CUDA device" in capsys.readouterr().err


def test_info_lists_versions_and_backends():
    result = subprocess.run([sys.executable, "-m", "fusediff", "info"], capture_output=True, text=True, check=True)
    out = result.stdout
    assert "fusediff 0.1.0" in out and f"torch {torch.__version__}" in out
    for op in ("scheduler_step", "group_norm", "attention", "timestep_embedding"):
        assert f"{op}" in out and "on cpu" in out
    env_ref = subprocess.run([sys.executable, "-m", "fusediff", "info"], capture_output=True, text=True,
                             check=True, env={**__import__("os").environ, "FUSEDIFF_KERNELS": "fused"}).stdout
    assert "scheduler_step       on cpu : fused C++ loop" in env_ref
