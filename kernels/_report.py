"""Which implementation each op runs on a device under the current backend setting (``fusediff info``)."""

from __future__ import annotations

import importlib

import torch

OPS = ("scheduler_step", "group_norm", "attention", "geglu", "timestep_embedding", "timestep_mlp")
# What an op's fused path is, per device type, for ops whose module decides with ``_use_fused``.
_FUSED = {
    "scheduler_step": {"cuda": "fused CUDA kernel (fusediff._C)", "cpu": "fused C++ loop (fusediff._C)"},
    "group_norm": {"cuda": "Triton kernel", "cpu": "Triton kernel in the interpreter"},
    "timestep_embedding": {"cuda": "Triton kernel (one launch)", "cpu": "Triton kernel in the interpreter"},
    "timestep_mlp": {"cuda": "Triton kernels (one or two launches)", "cpu": "Triton kernels in the interpreter"},
    "attention": {"cuda": "Triton flash-attention kernel", "cpu": "Triton flash-attention kernel in the interpreter"},
    "geglu": {"cuda": "Triton kernel", "cpu": "Triton kernel in the interpreter"},
}


def backend_report(device: str | torch.device) -> dict[str, str]:
    """Op name -> the implementation a float32 call on ``device`` would run now."""
    device = torch.device(device)
    probe = torch.empty(4, device=device)
    report = {}
    for op in OPS:
        module = importlib.import_module(f".{op}", __package__)
        use_fused = getattr(module, "_use_fused", None)
        if use_fused is None or op not in _FUSED:
            report[op] = "reference (PyTorch); no fused path yet"
        elif use_fused(probe, [probe]):
            report[op] = _FUSED[op].get(device.type, "fused")
        else:
            report[op] = "reference (PyTorch)"
    return report
