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


@pytest.mark.parametrize("kwargs, error, match", [
    ({"grad_accum": 0}, ValueError, "grad_accum"), ({"grad_accum": 1.5}, ValueError, "grad_accum"),
    ({"generators": [torch.Generator()]}, TypeError, "CUDA torch.Generator")])
def test_bad_accumulation_and_generator_settings(kwargs, error, match):
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(error, match=match):
        CUDAGraphTrainStep(lambda x: (p * x).sum(), torch.optim.SGD([p], lr=0.1), **kwargs)


def test_inputs_that_do_not_cut_into_micro_batches_are_refused():
    p = torch.nn.Parameter(torch.zeros(3))
    step = CUDAGraphTrainStep(lambda x: (p * x).sum(), torch.optim.SGD([p], lr=0.1), grad_accum=2)
    with pytest.raises(ValueError, match="cannot be cut into grad_accum=2"):
        step.eager_step(torch.ones(3, 3))


def test_eager_step_with_accumulation_is_the_full_batch_step():
    """The operations the graph records, run eagerly on the CPU: 4 micro-batches of a mean loss, each over
    grad_accum, summed in .grad, then clipping and SGD, equal one step on the whole batch (fp32 rounding)."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.randn(8, 2)
    results = []
    for accum in (1, 4):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.SiLU(), torch.nn.Linear(7, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # capturable AdamW is CUDA-only
        step = CUDAGraphTrainStep(lambda a, b: torch.nn.functional.mse_loss(model(a), b), opt,
                                  clip_grad_norm=0.5, grad_accum=accum)
        loss = step.eager_step(x, y)
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((loss, grads, [p.detach().clone() for p in model.parameters()]))
    (loss1, g1, w1), (loss4, g4, w4) = results
    print("losses", float(loss1), float(loss4), "max grad diff", max((a - b).abs().max().item() for a, b in zip(g1, g4)))
    torch.testing.assert_close(loss4, loss1, rtol=1e-6, atol=1e-7)
    for a, b in zip(g4, g1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(w4, w1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
