"""``fusediff train`` (``fusediff.training.cli``): one-line argument errors, and short tiny runs that write
pipeline directories loadable by fusediff and, component by component, by diffusers."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import fusediff
from fusediff.training import cli

TINY = ["--model-config", "tiny", "--image-size", "8", "--batch", "4", "--warmup", "0", "--device", "cpu", "--quiet"]


@pytest.mark.parametrize("argv, status, message", [
    ([], 2, "--out"),
    (["--steps", "0"], 2, "--steps"),
    (["--batch", "10", "--grad-accum", "3"], 2, "divisible by --grad-accum"),
    (["--cfg-drop-prob", "0.2"], 2, "needs --conditional"),
    (["--conditional", "--cfg-drop-prob", "1.5"], 2, "--cfg-drop-prob"),
    (["--mixed-precision", "fp8"], 2, "--mixed-precision"),
    (["--lr", "-1"], 2, "--lr"),
    (["--prediction-type", "x0"], 2, "--prediction-type"),
    (["--model-config", "huge"], 2, "--model-config"),
    (["--cuda-graph", "--device", "cpu"], 2, "--cuda-graph needs --device cuda"),
    (["--resume"], 1, "no checkpoint"),
    (["--resume", "/nonexistent/step_000001"], 1, "is not a directory"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, status, message):
    if "--out" not in argv and argv != []:
        argv = ["--out", str(tmp_path / "out"), *argv]
    assert cli.main(argv) == status
    err = capsys.readouterr().err
    assert err.startswith("fusediff train: error:") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out" / "model_index.json").exists()


def test_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli.main(["--out", str(tmp_path / "file"), *TINY]) == 1
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_a_gpu(tmp_path, capsys):
    assert cli.main(["--out", str(tmp_path), "--device", "cuda"]) == 1
    assert "no CUDA device" in capsys.readouterr().err


def test_add_arguments_builds_a_subcommand():
    """The lead's wiring: a subparser filled by add_arguments, dispatched to run."""
    parser = argparse.ArgumentParser(prog="fusediff")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_arguments(sub.add_parser("train"))
    args = parser.parse_args(["train", "--out", "x", "--conditional", "--resume"])
    assert (args.command, args.conditional, args.resume, args.cfg_drop_prob) == ("train", True, "latest", None)
    assert args.batch == 1024 and args.steps == 2500 and args.model_config == "digits"
    assert "--dist-timeout" not in parser.format_help() + sub.choices["train"].format_help()


def test_three_step_run_writes_a_loadable_pipeline(tmp_path, capsys):
    import diffusers

    out = tmp_path / "digits"
    assert cli.main(["--out", str(out), "--steps", "3", "--sample-every", "3", "--prediction-type", "v_prediction",
                     *TINY]) == 0
    assert capsys.readouterr().err == ""  # --quiet: no progress bar
    pipe = fusediff.DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, fusediff.DDPMPipeline)
    assert tuple(pipe.unet.config.block_out_channels) == cli.MODEL_CONFIGS["tiny"]["block_out_channels"]
    assert pipe.unet.config.sample_size == 8 and pipe.scheduler.config.prediction_type == "v_prediction"
    theirs = diffusers.UNet2DModel.from_pretrained(out / "unet")
    for name, value in pipe.unet.state_dict().items():
        assert torch.equal(theirs.state_dict()[name], value), name
    assert (out / "samples" / "step_000003.png").is_file()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3 and log[-1]["lr"] > 0
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


def test_conditional_run_and_resume(tmp_path, capsys):
    out = tmp_path / "cond"
    common = ["--out", str(out), "--conditional", "--cfg-drop-prob", "0.3", "--checkpoint-every", "2",
              "--sample-every", "4", *TINY]
    assert cli.main(["--steps", "2", *common]) == 0
    first = json.loads((out / "model_index.json").read_text())
    assert cli.main(["--steps", "4", "--resume", *common[:-1]]) == 0  # without --quiet: says where it resumed
    captured = capsys.readouterr()
    assert "resumed from" in captured.out and "step_000002" in captured.out, captured.out
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert {p.name for p in (out / "samples").iterdir()} == {"step_000002.png", "step_000004.png"}  # run ends too
    pipe = fusediff.DiffusionPipeline.from_pretrained(out)
    assert pipe.unet.config.num_class_embeds == cli.NUM_CLASSES + 1
    assert type(pipe).__name__ == first["_class_name"] == "ClassConditionalPipeline"
