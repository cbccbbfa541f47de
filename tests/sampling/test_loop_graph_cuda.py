"""Whole-loop CUDA graphs (fusediff.sampling.LoopGraphs) on a CUDA device, with a toy denoiser: the
replayed loop equals the eager loop bit for bit for single- and multistep schedulers, replays take new
noise, conditions and guidance scales without a new capture and never synchronise, a stochastic
scheduler captures with a CUDA generator (each call's own generator, advanced as eager advances it) and
falls back, with a warning and eager's numbers, with a CPU one; loops it cannot hold use the per-step
graphs."""

from __future__ import annotations

import functools

import pytest
import torch
from sampling.toy import ToyDenoiser, schedulers, spatial_shape
from support.cuda_sync import no_sync

from fusediff.sampling import Guidance, LoopGraphs, denoise

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ToyDenoiser(2).eval().cuda()


@functools.lru_cache(maxsize=None)
def _inputs(seed: int = 0):  # cached: made once, outside the no_sync() blocks
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(2, 2, *spatial_shape(2), generator=g).cuda()
    cond = torch.randn(4, 2, 1, 1, generator=g).cuda()
    return noise, cond


def _run(model, name, seed=0, scale=3.0, steps=5, generator=None, **kwargs) -> torch.Tensor:
    noise, cond = _inputs(seed)
    return denoise(schedulers(name)[0], model, noise, num_inference_steps=steps, model_kwargs={"cond": cond},
                   guidance=Guidance(scale, rescale=0.5), generator=generator, progress=False, **kwargs)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("name", ["ddim", "euler", "heun", "dpmpp_2m", "unipc"])
def test_whole_loop_replay_equals_eager(model, name):
    eager = {seed: _run(model, name, seed=seed) for seed in (0, 1)}  # also warms up _inputs
    graphs = LoopGraphs()
    first = _run(model, name, cuda_graph=graphs)  # eager: the signature's first call
    assert graphs.num_graphs == 0
    captured = _run(model, name, cuda_graph=graphs)  # captured, then replayed
    assert graphs.num_graphs == 1
    with no_sync():
        replayed = _run(model, name, seed=1, cuda_graph=graphs)  # new noise and condition, same graph
        again = _run(model, name, cuda_graph=graphs)
    print(f"{name}: capture vs eager {_diff(captured, eager[0]):.3e}, new seed {_diff(replayed, eager[1]):.3e}")
    assert torch.equal(first, eager[0]) and torch.equal(captured, eager[0]) and torch.equal(again, eager[0])
    assert torch.equal(replayed, eager[1]) and graphs.num_graphs == 1
    assert replayed.data_ptr() != again.data_ptr()  # outputs are copies, not the graph's buffer


def test_guidance_scale_is_data_and_step_count_a_new_signature(model):
    graphs = LoopGraphs()
    for _ in range(2):
        _run(model, "dpmpp_2m", cuda_graph=graphs)
    scaled = _run(model, "dpmpp_2m", scale=7.5, cuda_graph=graphs)
    assert torch.equal(scaled, _run(model, "dpmpp_2m", scale=7.5)) and graphs.num_graphs == 1
    longer = [_run(model, "dpmpp_2m", steps=8, cuda_graph=graphs) for _ in range(3)]
    eager = _run(model, "dpmpp_2m", steps=8)
    assert all(torch.equal(x, eager) for x in longer) and graphs.num_graphs == 2


def test_stochastic_step_with_a_cuda_generator_is_captured(model):
    def gen() -> torch.Generator:
        return torch.Generator("cuda").manual_seed(2)

    eager_gen = gen()
    eager = _run(model, "euler_a", generator=eager_gen)
    graphs = LoopGraphs()
    for _ in range(2):
        _run(model, "euler_a", generator=gen(), cuda_graph=graphs)
    replay_gen = gen()
    got = _run(model, "euler_a", generator=replay_gen, cuda_graph=graphs)
    other = _run(model, "euler_a", generator=torch.Generator("cuda").manual_seed(3), cuda_graph=graphs)
    print(f"euler_a CUDA generator: replay vs eager {_diff(got, eager):.3e}")
    assert graphs.num_graphs == 1 and torch.equal(got, eager)
    assert torch.equal(replay_gen.get_state(), eager_gen.get_state())  # advanced as the eager loop advanced it
    assert torch.equal(other, _run(model, "euler_a", generator=torch.Generator("cuda").manual_seed(3)))
    assert not torch.equal(other, got)


def test_stochastic_step_with_a_cpu_generator_falls_back(model):
    eager_gen = torch.Generator().manual_seed(2)
    eager = _run(model, "euler_a", generator=eager_gen)
    graphs = LoopGraphs()
    _run(model, "euler_a", generator=torch.Generator().manual_seed(2), cuda_graph=graphs)
    fallback_gen = torch.Generator().manual_seed(2)
    with pytest.warns(RuntimeWarning, match="cannot be one CUDA graph"):
        got = _run(model, "euler_a", generator=fallback_gen, cuda_graph=graphs)
    assert graphs.num_graphs == 0 and torch.equal(got, eager)
    assert torch.equal(fallback_gen.get_state(), eager_gen.get_state())  # the failed capture's draws undone


def test_loops_it_cannot_hold_use_the_per_step_graphs(model):
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append(i)
        return {}

    graphs = LoopGraphs()
    eager = _run(model, "ddim", callback_on_step_end=callback)
    got = _run(model, "ddim", callback_on_step_end=callback, cuda_graph=graphs)
    assert torch.equal(got, eager) and seen == list(range(5)) * 2
    assert graphs.num_graphs == 0 and graphs.step_graphs.num_graphs == 1
