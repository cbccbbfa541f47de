"""The split GroupNorm's scratch buffers on a CUDA device (kernels/_launch.py ``scratch``): kept between
calls on the default stream only, fresh on a side stream (where CUDA-graph warm-ups run and allocate into a
graph's pool), and so a model of fused GroupNorms compiled with ``mode="reduce-overhead"`` (torch.compile's
CUDA graphs, which reject any tensor left alive in their pool) runs and equals the eager op. Marked gpu."""

from __future__ import annotations

import importlib

import pytest
import torch

from fusediff import kernels as K

L = importlib.import_module("fusediff.kernels._launch")
GN = importlib.import_module("fusediff.kernels.group_norm_triton")
pytestmark = pytest.mark.gpu


def test_scratch_is_kept_on_the_default_stream_only():
    x = torch.zeros(4, device="cuda")
    a, b = L.scratch(x, "test.kept", 64), L.scratch(x, "test.kept", 32)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        c, d = L.scratch(x, "test.kept", 64), L.scratch(x, "test.kept", 64)
    print(a.data_ptr(), b.data_ptr(), c.data_ptr(), d.data_ptr())
    assert a.data_ptr() == b.data_ptr()  # the default stream reuses its buffer
    assert a.data_ptr() not in (c.data_ptr(), d.data_ptr()) and c.data_ptr() != d.data_ptr()


class _Norms(torch.nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(channels) * 0.1 + 1)
        self.b = torch.nn.Parameter(torch.randn(channels) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = K.group_norm(x, 32, self.w, self.b, 1e-5, activation="silu")
        return K.group_norm(h * 2 + x, 32, self.w, self.b, 1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_split_group_norm_under_compile_reduce_overhead(channels_last):
    torch.manual_seed(0)
    x = torch.randn(2, 320, 64, 64, device="cuda", dtype=torch.float16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert GN.plan(x, 32) == "split"  # the path that takes scratch buffers
    model = _Norms(320).to("cuda", torch.float16).eval()
    compiled = torch.compile(model, mode="reduce-overhead")
    with torch.no_grad():
        want = model(x)
        for k in range(4):  # warm-up, recording, then replays
            got = compiled(x).clone()
            err = (got.float() - want.float()).abs().max().item()
            print(f"call {k}: max |compiled - eager| {err:.3e}")
            torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
