"""fusediff.sampling.LoopGraphs on the CPU: the loop signature (tensor geometry, not data), the eager
first call and the fallback where a capture is impossible (with the scheduler restarted and the loop's
result unchanged), the pipeline switch ``enable_cuda_graph(whole_loop=True)``, and the refusal of a
host-to-device copy inside a capture. Replay itself is tested on a GPU (test_loop_graph_cuda.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from sampling.toy import ToyDenoiser, schedulers, spatial_shape

import fusediff
from fusediff.sampling import Guidance, LoopGraphs, ModelCallGraphs, denoise
from fusediff.sampling.loop_graph import freeze, generator_kind, generators_of, scheduler_signature
from fusediff.utils.torch_utils import to_device


def test_signature_keeps_geometry_not_data():
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    assert freeze((a, {"c": a})) == freeze((b, {"c": b}))
    assert freeze(a) != freeze(torch.zeros(3, 2))
    assert freeze(a) != freeze(torch.zeros(3, 2).t())  # same shape, other strides
    assert freeze(a) != freeze(a.double())
    unhashable = [object()]
    assert freeze({"x": unhashable}) == freeze({"x": unhashable})
    assert freeze({"x": [1]}) != freeze({"x": [2]})
    assert freeze(bytearray(b"a")) != freeze(bytearray(b"a"))  # unhashable: by identity


def test_generator_helpers_and_scheduler_signature():
    g = torch.Generator()
    assert generator_kind(None) is None and generator_kind(g) == "cpu" and generator_kind([g, g]) == ("cpu", "cpu")
    assert generators_of(None) == [] and generators_of(g) == [g] and generators_of([g, None, 3]) == [g]
    ddim, other = schedulers("ddim")[0], schedulers("ddim")[0]
    assert scheduler_signature(ddim) == scheduler_signature(other)
    other.register_to_config(eta_default_for_test=1)  # any config change is a new signature
    assert scheduler_signature(ddim) != scheduler_signature(other)
    assert scheduler_signature(schedulers("unipc")[0]) != scheduler_signature(ddim)


class _Stepper:
    """A stand-in scheduler: the loop body advances it."""

    def __init__(self) -> None:
        self.step_index, self.history = 0, []


def test_run_is_eager_first_and_falls_back_off_the_gpu():
    graphs, calls, stepper = LoopGraphs("toy"), [], _Stepper()

    def body(x: torch.Tensor) -> torch.Tensor:
        calls.append((stepper.step_index, len(stepper.history)))
        stepper.step_index += 1
        stepper.history.append(x)
        return x * 2

    def run(x: torch.Tensor) -> torch.Tensor:
        stepper.step_index, stepper.history = 0, []  # as set_timesteps does
        return graphs.run(key, body, (x,), scheduler=stepper)

    x = torch.arange(4.0)
    key = graphs.signature("toy", args=(x,))
    assert torch.equal(run(x), x * 2) and calls == [(0, 0)]  # first call of a signature: eager, no capture
    with pytest.warns(RuntimeWarning, match="cannot be one CUDA graph.*cpu"):
        second = run(x + 1)
    assert torch.equal(second, (x + 1) * 2) and calls == [(0, 0), (0, 0)]  # from the scheduler's start
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per signature
        third = run(x + 2)
    assert torch.equal(third, (x + 2) * 2) and graphs.num_graphs == 0 and len(calls) == 3
    graphs.reset()
    run(x)
    assert len(calls) == 4


def test_a_scheduler_state_that_cannot_be_copied_stays_eager():
    graphs, stepper = LoopGraphs("toy"), _Stepper()
    stepper.lock = __import__("threading").Lock()  # deepcopy refuses it
    x = torch.ones(2)
    key = graphs.signature(args=(x,))
    graphs.run(key, lambda t: t + 1, (x,), scheduler=stepper)
    with pytest.warns(RuntimeWarning, match="state cannot be copied"):
        assert torch.equal(graphs.run(key, lambda t: t + 1, (x,), scheduler=stepper), x + 1)


def test_scheduler_signature_follows_its_host_tables():
    a, b = schedulers("euler")[0], schedulers("euler")[0]
    a.set_timesteps(5)
    b.set_timesteps(5)
    assert scheduler_signature(a) == scheduler_signature(b)
    b.sigmas = b.sigmas * 1.01  # custom sigmas at the same timesteps: other coefficients, another graph
    assert scheduler_signature(a) != scheduler_signature(b)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler_a"])
def test_denoise_with_loop_graphs_on_the_cpu_equals_eager(name):
    torch.manual_seed(0)
    model = ToyDenoiser(2).eval()
    noise = torch.randn(2, 2, *spatial_shape(2), generator=torch.Generator().manual_seed(0))
    cond = torch.randn(4, 2, 1, 1, generator=torch.Generator().manual_seed(1))

    def run(**kwargs) -> torch.Tensor:
        with torch.no_grad():
            return denoise(schedulers(name)[0], model, noise, num_inference_steps=4, model_kwargs={"cond": cond},
                           guidance=Guidance(3.0), generator=torch.Generator().manual_seed(2), progress=False,
                           **kwargs)

    eager = run()
    graphs = LoopGraphs()
    with pytest.warns(RuntimeWarning, match="CUDA graph capture is not possible"):
        got = run(cuda_graph=graphs)  # off the GPU a LoopGraphs runs its per-step graphs, which fall back
    assert torch.equal(got, eager) and graphs.num_graphs == 0


def test_pipeline_switch_for_whole_loops():
    pipe = fusediff.DDPMPipeline(unet=fusediff.UNet2DModel(sample_size=8, in_channels=3, out_channels=3,
                                                            layers_per_block=1, block_out_channels=(8, 16),
                                                            down_block_types=("DownBlock2D", "DownBlock2D"),
                                                            up_block_types=("UpBlock2D", "UpBlock2D"),
                                                            norm_num_groups=4),
                                 scheduler=fusediff.DDIMScheduler())
    with pytest.raises(TypeError, match="whole_loop must be a bool"):
        pipe.enable_cuda_graph(whole_loop="yes")
    assert pipe.model_call_graphs("unet step", pipe.unet) is None
    pipe.enable_cuda_graph()
    assert type(pipe.model_call_graphs("unet step", pipe.unet)) is ModelCallGraphs
    pipe.enable_cuda_graph(whole_loop=True)  # another mode: the per-step graphs are dropped
    whole = pipe.model_call_graphs("unet step", pipe.unet)
    assert isinstance(whole, LoopGraphs) and whole is pipe.model_call_graphs("unet step", pipe.unet)
    pipe.enable_cuda_graph(whole_loop=True)  # the same mode: kept
    assert pipe.model_call_graphs("unet step", pipe.unet) is whole
    pipe.disable_cuda_graph()
    assert pipe.model_call_graphs("unet step", pipe.unet) is None and "_cuda_graphs" not in pipe.__dict__
    assert "whole_loop" not in str(pipe.config)


def test_no_host_to_device_copy_inside_a_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="inside a CUDA graph capture"):
        to_device(torch.zeros(2), "cuda")
    assert to_device(torch.zeros(2), "cpu").device.type == "cpu"
