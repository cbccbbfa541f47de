"""fusediff: diffusion models, schedulers and pipelines whose hot paths run fused kernels.

``fusediff.kernels`` holds the ops (each with a plain-PyTorch ``*_ref``); the compiled
extension ``fusediff._C`` holds the C++/CUDA code and is loaded when a fused op first runs.
Models, schedulers and pipelines are exported here as well as from their subpackages; they
are imported on first use, so ``import fusediff`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from . import kernels  # noqa: E402

# public name -> submodule that defines it
_EXPORTS = {
    "ConfigMixin": "configuration",
    "FrozenDict": "configuration",
    "register_to_config": "configuration",
    "ModelMixin": "modeling",
    "UNet2DModel": "models",
    "UNet2DOutput": "models",
    "SchedulerMixin": "schedulers",
    "SchedulerOutput": "schedulers",
    "DDPMScheduler": "schedulers",
    "DDIMScheduler": "schedulers",
    "PNDMScheduler": "schedulers",
    "DiffusionPipeline": "pipelines",
    "ImagePipelineOutput": "pipelines",
    "DDPMPipeline": "pipelines",
    "DDIMPipeline": "pipelines",
    "PNDMPipeline": "pipelines",
}

__all__ = ["__version__", "kernels", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fusediff' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
