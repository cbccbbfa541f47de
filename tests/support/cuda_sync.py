"""``no_sync()``: a block in which any host synchronisation with the CUDA device raises."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def no_sync() -> Iterator[None]:
    """Raise "called a synchronizing CUDA operation" on any synchronising call inside the block
    (``torch.cuda.set_sync_debug_mode("error")``); earlier work is finished first."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
