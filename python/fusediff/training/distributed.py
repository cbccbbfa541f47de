"""Distributed data parallel training from torchrun's environment: process group, device, DDP wrap.

``torchrun --nproc_per_node N ...`` (``python -m torch.distributed.run``) starts one process per
device and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; :func:`distributed`
reads them, joins the process group (NCCL on CUDA, gloo on the CPU), picks the process's device
(``cuda:LOCAL_RANK``) and destroys the group on the way out, also when training raised. Without
WORLD_SIZE (or with WORLD_SIZE=1) it is one plain process and nothing is initialised.

The model is wrapped whole in :class:`torch.nn.parallel.DistributedDataParallel`: for diffusion
training that is the ``Sampler``, whose forward returns the loss, so DDP's hooks see the forward
and all-reduce (average) the gradients in the backward. Rank 0 writes files; :func:`barrier`
keeps the others from running ahead of (or reading) a checkpoint being written.
Limits: one node was tested (gloo on CPU); multi-node runs need a filesystem shared by all ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and shows progress (rank 0)."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when a process group of more than one process is in use."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from None


def resolve_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """``device`` as a torch.device: None means CUDA when available, else CPU; "cuda" means ``cuda:local_rank``."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda: no CUDA device is available (use cpu)")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise ValueError(f"device must be cpu or cuda, got {str(device)!r}")
    return device


def init_distributed(device: str | torch.device | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join torchrun's process group if WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU); else a single process."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    dev = resolve_device(device, local_rank)
    if world_size == 1:
        return DistInfo(0, 1, 0, dev)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"WORLD_SIZE={world_size} but {name} is not set: start the run with torchrun")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    return DistInfo(rank, world_size, local_rank, dev)


def cleanup() -> None:
    """Destroy the process group if one is initialised (safe to call more than once)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device: str | torch.device | None = None, timeout_s: float = 1800.0) -> Iterator[DistInfo]:
    """``with distributed("cuda") as info:`` -- :func:`init_distributed`, then :func:`cleanup` even on error."""
    info = init_distributed(device, timeout_s)
    try:
        yield info
    finally:
        if info.enabled:
            cleanup()


def current() -> DistInfo:
    """The rank and world size of the initialised process group (device left as CPU), or a single process."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return DistInfo()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap_ddp(module: torch.nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when ``info`` is distributed, else ``module`` itself.

    DDP broadcasts rank 0's parameters and buffers at construction, so every rank starts alike.
    """
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)
