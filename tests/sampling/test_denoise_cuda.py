"""fusediff.sampling.denoise on a CUDA device for samples of rank 1, 2 and 3: no host synchronisation inside
the loop (``torch.cuda.set_sync_debug_mode("error")``), CUDA-graph replay equal to the eager loop, one
graph across loops of the same shapes, and the same result as the CPU."""

from __future__ import annotations

import pytest
import torch
from sampling.toy import ToyDenoiser, schedulers, spatial_shape
from support.cuda_sync import no_sync

from fusediff.sampling import Guidance, ModelCallGraphs, denoise

pytestmark = pytest.mark.gpu


def _case(rank: int, device: str = "cuda"):
    torch.manual_seed(rank)
    model = ToyDenoiser(rank).eval().to(device)
    noise = torch.randn(2, 2, *spatial_shape(rank), generator=torch.Generator().manual_seed(0)).to(device)
    cond = torch.randn(4, 2, *([1] * rank), generator=torch.Generator().manual_seed(1)).to(device)
    return model, noise, cond


def _run(case, name: str, **kwargs) -> torch.Tensor:
    model, noise, cond = case
    ours, _ = schedulers(name)
    with torch.no_grad():
        return denoise(ours, model, noise, num_inference_steps=5, model_kwargs={"cond": cond},
                       guidance=Guidance(3.0, rescale=0.5), generator=torch.Generator().manual_seed(2),
                       progress=False, **kwargs)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("name", ["ddim", "euler_a", "dpmpp_2m", "unipc"])
def test_loop_never_synchronises_and_graphs_equal_eager(rank, name):
    case = _case(rank)
    eager = _run(case, name)  # warm-up: lazy kernels, pinned buffers
    with no_sync():
        again = _run(case, name)
    graphs = ModelCallGraphs()
    graphed = _run(case, name, cuda_graph=graphs)  # the capture may synchronise
    with no_sync():
        replayed = _run(case, name, cuda_graph=graphs)
    print(f"rank {rank} {name}: graph vs eager max |diff| {(graphed - eager).abs().max().item():.3e}")
    assert torch.equal(again, eager) and torch.equal(graphed, eager) and torch.equal(replayed, eager)
    assert graphs.num_graphs == 1


@pytest.mark.parametrize("rank", [1, 3])
def test_gpu_matches_cpu(rank, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    gpu, cpu = _run(_case(rank), "dpmpp_2m"), _run(_case(rank, "cpu"), "dpmpp_2m")
    diff = (gpu.cpu() - cpu).abs().max().item()
    print(f"rank {rank}: max |gpu - cpu| {diff:.3e}")
    assert diff <= 1e-4 * max(1.0, cpu.abs().max().item())
