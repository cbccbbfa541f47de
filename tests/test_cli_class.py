"""``fusediff sample --class``: class-conditional sampling from a tiny saved ClassConditionalPipeline (the
same images as the Python API), the classes drawn for --class/--batch, the shipped-model names, the
``train`` subcommand's wiring, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from support.parity import one_thread  # noqa: F401  (one_thread: autouse)

import fusediff.cli as cli
from fusediff import ClassConditionalPipeline, DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel
from fusediff.cli import main

UNET = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4)
NUM_CLASSES = 3  # + the null class 3


def _unet(**overrides) -> UNet2DModel:
    torch.manual_seed(0)
    unet = UNet2DModel(**dict(UNET, **overrides))
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


@pytest.fixture(scope="module")
def cond_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli-class") / "cond"
    ClassConditionalPipeline(unet=_unet(num_class_embeds=NUM_CLASSES + 1),
                             scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli-class") / "plain"
    DDPMPipeline(unet=_unet(), scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(directory)
    return directory


def _sample(model, *args):
    return main(["sample", "--model", str(model), "--steps", "2", "--quiet", *args])


def _api_images(directory, labels, guidance=None, seed=0):
    pipe = DiffusionPipeline.from_pretrained(directory)
    pipe.set_progress_bar_config(disable=True)
    return pipe(labels, guidance_scale=guidance, num_inference_steps=2,
                generator=torch.Generator().manual_seed(seed)).images


def _written(directory, count):
    names = sorted(p.name for p in directory.iterdir())
    assert names == [f"sample_{i:04d}.png" for i in range(count)], names
    return [np.asarray(PIL.Image.open(directory / n)) for n in names]


def _assert_same_images(written, expected, what):
    assert len(written) == len(expected), what
    for i, (w, e) in enumerate(zip(written, expected)):
        assert np.array_equal(w, np.asarray(e)), f"{what}: image {i} differs from the API's"


def test_grid_of_one_class(cond_dir, tmp_path):
    out = tmp_path / "grid.png"
    assert _sample(cond_dir, "--class", "1", "--batch", "5", "--out", str(out)) == 0
    grid = PIL.Image.open(out)
    assert grid.size == (3 * 10 + 2, 2 * 10 + 2) and grid.mode == "L"  # 3 x 2 cells of 8 px + 2 px gaps


@pytest.mark.parametrize("args, labels, guidance", [
    (["--class", "2", "--batch", "3", "--guidance", "3.5"], [2, 2, 2], 3.5),
    (["--class", "0,2", "--class", "1"], [0, 2, 1], None),           # one image per class, in order
    (["--class", "0,1", "--batch", "5"], [0, 1, 0, 1, 0], None),      # classes repeated to fill --batch
    (["--batch", "4", "--guidance", "1"], [0, 1, 2, 0], 1.0),         # no --class: all classes in turn
])
def test_images_equal_the_api_ones(cond_dir, tmp_path, args, labels, guidance):
    assert _sample(cond_dir, *args, "--seed", "4", "--out-dir", str(tmp_path)) == 0
    _assert_same_images(_written(tmp_path, len(labels)), _api_images(cond_dir, labels, guidance, seed=4), str(args))


def test_other_schedulers(cond_dir, tmp_path):
    assert _sample(cond_dir, "--class", "1", "--batch", "2", "--scheduler", "euler_a", "--out-dir",
                   str(tmp_path / "a")) == 0
    assert _sample(cond_dir, "--class", "1", "--batch", "2", "--scheduler", "ddim", "--out-dir",
                   str(tmp_path / "b")) == 0
    a, b = _written(tmp_path / "a", 2), _written(tmp_path / "b", 2)
    assert not np.array_equal(a[0], b[0])  # the scheduler was swapped


def test_a_ddpm_directory_with_a_class_table_is_class_conditional(tmp_path):
    directory = tmp_path / "ddpm-cond"
    DDPMPipeline(unet=_unet(num_class_embeds=NUM_CLASSES + 1),
                 scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(directory)
    assert _sample(directory, "--class", "2", "--batch", "2", "--out-dir", str(tmp_path / "out")) == 0
    wrapped = ClassConditionalPipeline(**DiffusionPipeline.from_pretrained(directory).components)
    wrapped.set_progress_bar_config(disable=True)
    expected = wrapped([2, 2], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    _assert_same_images(_written(tmp_path / "out", 2), expected, "DDPMPipeline directory")


def test_shipped_model_names(cond_dir, tmp_path, monkeypatch):
    assert cli._model_source(None) == cli.DIGITS_MODEL == cli._model_source("digits")
    assert cli._model_source("./digits") == "./digits"  # a local directory of that name
    monkeypatch.setitem(cli.SHIPPED_MODELS, "digits-cond", cond_dir)
    assert main(["sample", "--model", "digits-cond", "--class", "2", "--steps", "2", "--quiet",
                 "--out", str(tmp_path / "g.png")]) == 0


def test_missing_shipped_model_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(cli.SHIPPED_MODELS, "digits-cond", tmp_path / "absent")
    assert main(["sample", "--model", "digits-cond", "--class", "7", "--out", "x.png"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shipped model 'digits-cond' is not in this installation" in err, err


def _no_null_dir(tmp_path):
    directory = tmp_path / "no-null"
    ClassConditionalPipeline(unet=_unet(num_class_embeds=NUM_CLASSES), scheduler=DDPMScheduler(num_train_timesteps=50),
                             null_class_label=None).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("model, args, status, message", [
    ("cond", ["--class", "3"], 2, "argument --class: class_labels [3] are out of range: this model's classes are 0-2"),
    ("cond", ["--class", "1,9"], 2, "[9] are out of range"),
    ("cond", ["--class", "-1"], 2, "out of range"),
    ("cond", ["--class", "x"], 2, "argument --class: expected integers separated by commas, got 'x'"),
    ("cond", ["--class", "1,"], 2, "expected integers"),
    ("cond", ["--class", "0,1,2", "--batch", "2"], 2, "--batch 2 is fewer images than the 3 classes"),
    ("cond", ["--class", "1", "--prompt", "a cat"], 2, "--class draws classes of a class-conditional model"),
    ("cond", ["--class", "1", "--steps", "500"], 1, "num_inference_steps"),
    ("plain", ["--class", "1"], 1, "holds a DDPMPipeline that is not class-conditional"),
    ("plain", ["--guidance", "2"], 2, "--guidance needs --prompt (a text-to-image model) or a class-conditional"),
    ("plain", ["--scheduler", "euler"], 2, "invalid choice"),
    ("no-null", ["--class", "1", "--guidance", "2"], 1, "needs a null class"),
])
def test_errors_are_one_line(cond_dir, plain_dir, tmp_path, capsys, model, args, status, message):
    directory = {"cond": cond_dir, "plain": plain_dir}.get(model) or _no_null_dir(tmp_path)
    steps = [] if "--steps" in args else ["--steps", "2"]
    assert main(["sample", "--model", str(directory), "--quiet", *steps, *args, "--out", str(tmp_path / "x.png")]) \
        == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fusediff: error:") and message in err, err
    assert not (tmp_path / "x.png").exists()


def test_guidance_one_works_without_a_null_class(tmp_path):
    assert _sample(_no_null_dir(tmp_path), "--class", "2", "--batch", "1", "--out", str(tmp_path / "g.png")) == 0


def test_train_is_a_subcommand_that_sampling_does_not_import(capsys):
    """``fusediff train`` takes fusediff.training.cli's options; other commands never import training."""
    code = textwrap.dedent("""
        import sys
        from fusediff.cli import build_parser
        build_parser().parse_args(["sample", "--out", "x.png"])
        assert not any(m.startswith("fusediff.training") for m in sys.modules), "sampling imported training"
        args = build_parser(with_training=True).parse_args(["train", "--out", "d", "--conditional"])
        assert args.command == "train" and args.conditional and "fusediff.training.cli" in sys.modules
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    assert main(["train"]) == 2  # --out is required: parsed by the training options
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err, err
