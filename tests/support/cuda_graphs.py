"""``warm_and_capture(fn)``: run ``fn`` once on a side stream (so lazy allocations and kernel loads happen
outside the capture), then capture it into a CUDA graph and return the graph."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fusediff.utils.cuda_graph import capture


def warm_and_capture(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with capture(graph):
        fn()
    return graph
