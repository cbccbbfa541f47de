"""``fusediff sample --prompt`` on DeepFloyd IF directories saved by diffusers: stage I writes the Python API's
image, another sampler swaps in, an img2img directory samples as stage I, and stage II is a one-line error."""

from __future__ import annotations

import PIL.Image
import pytest
import torch
from pipelines.tiny_if import SIZE, build_if

from fusediff import DiffusionPipeline
from fusediff.cli import main


@pytest.fixture(scope="module")
def if_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-if")
    for name in ("IFPipeline", "IFImg2ImgPipeline", "IFSuperResolutionPipeline"):
        build_if(root / name, name)
    return root


def _sample(model, *args):
    return main(["sample", "--model", str(model), "--steps", "2", "--quiet", *args])


@pytest.mark.parametrize("name", ["IFPipeline", "IFImg2ImgPipeline"])
def test_stage_one_writes_the_api_image(if_dirs, tmp_path, name):
    assert _sample(if_dirs / name, "--prompt", "a red cat", "--negative-prompt", "blur", "--guidance", "4",
                   "--seed", "3", "--out-dir", str(tmp_path)) == 0
    written = PIL.Image.open(tmp_path / "sample_0000.png")
    assert written.size == (SIZE, SIZE) and written.mode == "RGB"
    pipe = DiffusionPipeline.from_pretrained(if_dirs / "IFPipeline")
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a red cat", negative_prompt="blur", guidance_scale=4.0, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(3)).images[0]
    assert written.tobytes() == expected.tobytes()


def test_other_sampler_and_batch(if_dirs, tmp_path):
    assert _sample(if_dirs / "IFPipeline", "--prompt", "a cat", "--scheduler", "ddim", "--batch", "2",
                   "--height", "16", "--width", "24", "--out-dir", str(tmp_path)) == 0
    images = sorted(tmp_path.iterdir())
    assert len(images) == 2 and PIL.Image.open(images[0]).size == (24, 16)


def test_super_resolution_is_a_one_line_error(if_dirs, tmp_path, capsys):
    assert _sample(if_dirs / "IFSuperResolutionPipeline", "--prompt", "a cat", "--out", str(tmp_path / "g.png")) == 1
    err = capsys.readouterr().err.strip()
    assert "super-resolution stage" in err and "\n" not in err
