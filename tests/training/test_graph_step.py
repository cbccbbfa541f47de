"""CUDAGraphTrainStep's argument checks, which hold on any machine (the replay itself is in
test_graph_step_cuda.py)."""

from __future__ import annotations

import pytest
import torch

from fusediff.training.graph_step import CUDAGraphTrainStep


def test_needs_a_capturable_optimizer():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="capturable=True"):
        CUDAGraphTrainStep(lambda x: (p * x).sum(), torch.optim.AdamW([p]))


@pytest.mark.parametrize("kwargs, match", [({"warmup": 0}, "warmup"), ({"clip_grad_norm": 0.0}, "clip_grad_norm")])
def test_bad_settings(kwargs, match):
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=match):
        CUDAGraphTrainStep(lambda x: (p * x).sum(), torch.optim.AdamW([p], capturable=True), **kwargs)


def test_cpu_inputs_are_refused():
    p = torch.nn.Parameter(torch.zeros(3))
    step = CUDAGraphTrainStep(lambda x: (p * x).sum(), torch.optim.AdamW([p], capturable=True))
    with pytest.raises(TypeError, match="CUDA tensor"):
        step(torch.ones(3))
