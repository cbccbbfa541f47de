"""A CUDA-graph capture survives Python's cyclic garbage collector: an unreachable cycle holding an earlier
captured graph (a dropped pipeline) is not destroyed mid-capture, which would fail the capture with
"operation failed due to a previous error during capture" (utils/cuda_graph.py ``capture``). Marked gpu."""

from __future__ import annotations

import gc

import pytest
import torch

from fusediff.utils.cuda_graph import CUDAGraphCallable

pytestmark = pytest.mark.gpu


class _Cycle:
    def __init__(self, graphed: CUDAGraphCallable) -> None:
        self.graphed, self.me = graphed, self


def _work(x):
    for _ in range(50):
        x = torch.relu(x * 1.01 + 0.1) - 0.05
    return x


def test_capture_with_a_dead_graph_in_a_cycle():
    x = torch.randn(64, device="cuda")
    dead = CUDAGraphCallable(_work)
    dead(x)
    assert dead.num_graphs == 1
    keep = [_Cycle(dead)]  # a cycle holding a captured graph, reachable only from keep
    del dead

    def fn(x):
        if torch.cuda.is_current_stream_capturing():
            keep.clear()  # the cycle becomes garbage during the capture ...
            _ = [[object()] for _ in range(5000)]  # ... and the collector would run now
        return _work(x)

    old = gc.get_threshold()
    gc.set_threshold(10, 1, 1)
    try:
        graphed = CUDAGraphCallable(fn)
        out = graphed(x)
    finally:
        gc.set_threshold(*old)
    assert gc.isenabled()
    assert not keep
    assert graphed.num_graphs == 1, "the capture fell back to eager"
    torch.testing.assert_close(out, _work(x), rtol=0, atol=0)
