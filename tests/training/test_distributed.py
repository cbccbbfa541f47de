"""Data-parallel training: 2 processes over gloo on the CPU, started by torchrun in a subprocess.

Each rank trains on its own half of every global batch with its own noise; only the all-reduce of
DDP's backward can keep the two copies of the weights equal, so equal weights on both ranks (and
different from the start) show the gradients were synchronised. A hang fails at the timeouts
instead of blocking the test run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import fusediff
from fusediff.training.cli import build_parser, build_sampler

TIMEOUT_S = 240  # the whole torchrun, start-up of two Python processes on a loaded machine included


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_ranks_over_gloo_end_with_identical_trained_weights(tmp_path):
    out = tmp_path / "run"
    argv = ["--out", str(out), "--model-config", "tiny", "--image-size", "8", "--steps", "3", "--batch", "8",
            "--grad-accum", "2", "--warmup", "0", "--lr", "1e-2", "--device", "cpu", "--checkpoint-every", "3",
            "--quiet", "--dist-timeout", "60"]
    env = {**os.environ, "FUSEDIFF_TRAIN_DUMP_RANK_WEIGHTS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fusediff.training.cli", *argv]
    # a session of its own, so that a hang can be ended with torchrun's workers and nothing else
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s:\n{stdout}\n{stderr[-4000:]}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{stdout}\n{stderr[-4000:]}"

    rank0, rank1 = (load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between the ranks"
    _, sampler, _ = build_sampler(build_parser().parse_args(argv))  # the same seeded initial weights
    initial = sampler.model.unet.state_dict()
    changed = [k for k in rank0 if not torch.equal(rank0[k], initial[k])]
    assert len(changed) > len(rank0) // 2, f"only {changed} changed"

    # rank 0 wrote the pipeline and a checkpoint written with both ranks' RNG states
    pipe = fusediff.DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, fusediff.DDPMPipeline)
    state = torch.load(out / "checkpoints" / "step_000003" / "training_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["generator"], state["rng"][1]["generator"]), "ranks share their noise"
