"""GLIDE pipelines: the converted directory's files, save/load round trips, bad input, and the command line."""

from __future__ import annotations

import json

import pytest
import torch

from fusediff import DiffusionPipeline, GlideInpaintPipeline, GlidePipeline, GlideUpsamplePipeline
from fusediff.cli import main

from pipelines.tiny_glide import build_glide


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    directory, _, _ = build_glide(tmp_path_factory.mktemp("glide"), "base")
    return directory


def _pipe(directory, cls=DiffusionPipeline):
    pipe = cls.from_pretrained(directory)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, **kw):
    kw = {"timestep_respacing": "5", "generator": torch.Generator().manual_seed(0), "output_type": "pt", **kw}
    return pipe("a corgi", **kw).images


def test_converted_directory_layout(base):
    index = json.loads((base / "model_index.json").read_text())
    assert index["_class_name"] == "GlidePipeline"
    assert index["text_encoder"] == ["fusediff", "GlideTextEncoder"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["tokenizer"][0] == "transformers" and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    scheduler = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["variance_type"] == "learned_range" and scheduler["beta_schedule"] == "squaredcos_cap_v2"
    assert not list(base.parent.glob(".*tmp*"))  # the atomic write left nothing behind


def test_save_and_load_round_trip(base, tmp_path):
    pipe = _pipe(base)
    first = _run(pipe)
    pipe.save_pretrained(tmp_path / "again")
    again = _pipe(tmp_path / "again", GlidePipeline)
    assert torch.equal(_run(again), first)
    assert torch.equal(_run(pipe), first)  # same seed, same image


def test_components_make_the_other_pipelines(base):
    """The base directory's components make an inpainting pipeline only with a 7-channel UNet: refused by name."""
    pipe = _pipe(base)
    inpaint = GlideInpaintPipeline(**pipe.components)
    with pytest.raises(ValueError, match="7 input channels"):
        inpaint("a", image=torch.zeros(1, 3, 16, 16), mask_image=torch.zeros(1, 1, 16, 16))


def test_bad_inputs(base):
    pipe = _pipe(base)
    for kw, message in [(dict(num_images_per_prompt=0), "num_images_per_prompt"),
                        (dict(output_type="latent"), "output_type"),
                        (dict(timestep_respacing="5", num_inference_steps=5), "one of"),
                        (dict(timestep_respacing="abc"), "timestep_respacing"),
                        (dict(timestep_respacing="2000"), "cannot divide"),
                        (dict(negative_prompt=["a", "b"]), "negative_prompt"),
                        (dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["x"]),
                         "callback_on_step_end_tensor_inputs")]:
        with pytest.raises(ValueError, match=message):
            _run(pipe, **{"timestep_respacing": None, **kw} if "num_inference_steps" in kw else kw)
    with pytest.raises(ValueError, match="prompt"):
        pipe([], timestep_respacing="5")
    pipe.tokenizer = None
    with pytest.raises(ValueError, match="no tokenizer"):
        _run(pipe)


def test_guidance_one_is_the_conditional_model_and_callbacks_run(base):
    pipe = _pipe(base)
    steps = []
    out = _run(pipe, guidance_scale=1.0, callback_on_step_end=lambda p, i, t, d: steps.append(int(t)) or {})
    assert out.shape == (1, 3, 16, 16) and len(steps) == 5 and steps[-1] == 0
    assert not torch.equal(out, _run(pipe, guidance_scale=4.0))
    images = pipe(["a", "b"], num_images_per_prompt=2, timestep_respacing="3", output_type="pil").images
    assert len(images) == 4 and images[0].size == (16, 16)


def test_upsample_and_inpaint_inputs(tmp_path):
    up_dir, _, _ = build_glide(tmp_path, "upsample")
    up = _pipe(up_dir)
    assert isinstance(up, GlideUpsamplePipeline)
    with pytest.raises(ValueError, match="low-resolution image"):
        up("a", image=None)
    with pytest.raises(ValueError, match="3 channels"):
        up("a", image=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="upsample_temp"):
        up("a", image=torch.zeros(1, 3, 8, 8), upsample_temp=0)
    with pytest.raises(ValueError, match="for 2 prompts"):
        up(["a", "b"], image=torch.zeros(3, 3, 8, 8))
    assert up("a", image=torch.zeros(1, 3, 8, 8), timestep_respacing="3", output_type="pt").images.shape == \
        (1, 3, 16, 16)
    in_dir, _, _ = build_glide(tmp_path, "base-inpaint")
    inpaint = _pipe(in_dir)
    with pytest.raises(ValueError, match=r"needs \(16, 16\)"):
        inpaint("a", image=torch.zeros(1, 3, 8, 8), mask_image=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        inpaint("a", image=torch.zeros(1, 3, 16, 16), mask_image=torch.full((16, 16), 2.0))
    with pytest.raises(TypeError, match="mask_image"):
        inpaint("a", image=torch.zeros(1, 3, 16, 16), mask_image="mask.png")


def test_command_line_convert_and_sample(tmp_path, capsys):
    from models import glide_reference as ref
    from pipelines.tiny_glide import tiny_options, write_vocabulary

    # the CLI converts published hyperparameters only: a tiny checkpoint is refused, naming the tensors
    state = ref.random_state_dict(tiny_options("base"))
    torch.save(state, tmp_path / "tiny.pt")
    assert main(["convert", "glide", str(tmp_path / "tiny.pt"), str(tmp_path / "out")]) == 1
    assert "mis-shaped" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["convert", "glide", str(tmp_path / "absent.pt"), str(tmp_path / "out")]) == 1
    directory, _, _ = build_glide(tmp_path, "base")
    assert main(["sample", "--model", str(directory), "--prompt", "a corgi", "--steps", "3", "--quiet",
                 "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()
    assert main(["sample", "--model", str(directory), "--prompt", "a", "--scheduler", "ddim", "--quiet",
                 "--out", str(tmp_path / "h.png")]) == 1
    write_vocabulary(tmp_path / "v")
    up_dir, _, _ = build_glide(tmp_path, "upsample")
    assert main(["sample", "--model", str(up_dir), "--prompt", "a", "--quiet", "--out", str(tmp_path / "u.png")]) == 1
    assert "needs images too" in capsys.readouterr().err
