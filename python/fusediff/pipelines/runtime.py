"""Run-time choices of a pipeline's denoising loop: CUDA graphs, memory layout, host-side timesteps.

These are never saved with a pipeline (DESIGN.md, decision 8).

- **CUDA graphs** (:meth:`SamplingRuntime.enable_cuda_graph`): the model call of a step, with
  classifier-free guidance, is captured once per input signature (shapes, dtypes, layout and
  the loop's flags) by :class:`fusediff.utils.cuda_graph.CUDAGraphCallable` and replayed on
  every later step and call. Prompt embeddings, the timestep and the guidance scale are tensor
  inputs, so new prompts, seeds, guidance scales and step counts replay the same graph. The
  scheduler update runs after the replay as one fused launch with coefficients passed by value
  (see "Limits"). Where capture is impossible (CPU tensors, an op that reads the device) the
  step runs eagerly, with a warning.
- **Layout**: a model converted with ``model.to(memory_format=torch.channels_last)`` gets its
  latents in channels-last too (:func:`module_memory_format`), so no step copies between layouts.
- **No host reads in the loop**: the loop steps the scheduler with the timesteps' CPU copy
  (:func:`loop_timesteps`) and gives the model their device copy; schedulers keep their tables
  on the host and their noise is copied from pinned memory without waiting.

Limits: the scheduler update is not inside the graph. The ten schedulers keep their multistep
history and draw their noise in Python between model calls; the update itself is one kernel on a
few hundred kilobytes (a few microseconds of GPU time) whose launch overlaps the model's work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..models.layout import memory_format_of
from ..utils.cuda_graph import CUDAGraphCallable
from ..utils.torch_utils import to_device


def module_memory_format(module: Any) -> torch.memory_format:
    """The layout of ``module``'s first 4-D weight with more than one element per filter (its
    convolutions' layout): ``torch.channels_last`` or ``torch.contiguous_format``."""
    if isinstance(module, torch.nn.Module):
        for p in module.parameters():
            if p.dim() == 4 and p.shape[1] * p.shape[2] * p.shape[3] > 1:
                return memory_format_of(p)
    return torch.contiguous_format


def in_layout(x: torch.Tensor, module: Any) -> torch.Tensor:
    """``x`` (B, C, H, W) in channels-last if ``module``'s convolutions are (a copy only if it is not yet);
    otherwise ``x`` as it is, so that a contiguous model sees the tensors diffusers would give it."""
    if x.dim() != 4 or module_memory_format(module) != torch.channels_last:
        return x
    return x.contiguous(memory_format=torch.channels_last)


def loop_timesteps(timesteps: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(host, device) copies of a run's timesteps, made before the loop: the scheduler steps with
    ``host[i]`` and the model reads ``device[i]``, so no step waits for the device."""
    host = torch.as_tensor(timesteps).cpu()
    return host, to_device(host, device)


def _first_weight(module: Any) -> tuple[int, str, str] | None:
    """Address, device and dtype of a module's first parameter: they change when the module is moved,
    cast, converted to another layout or given new weight tensors, which a captured graph would miss."""
    if isinstance(module, torch.nn.Module):
        for p in module.parameters():
            return p.data_ptr(), str(p.device), str(p.dtype)
    return None


class SamplingRuntime:
    """Mixin of :class:`~fusediff.pipelines.DiffusionPipeline`: the CUDA-graph switch and its graphs."""

    def enable_cuda_graph(self) -> None:
        """Replay each denoising step's model call (and guidance) from a CUDA graph.

        The first call with a new shape, dtype, layout or batch captures a graph (it costs about
        one extra step); later calls with the same shapes replay it, whatever the prompt, seed,
        guidance scale or step count. Replacing a model (``pipe.unet = ...``), moving, casting or
        converting it to another layout captures anew; weights updated in place are seen by the graph. Outputs equal the eager loop's. On a CPU, or where capture
        fails, the loop runs eagerly with a warning.
        """
        self.__dict__["_cuda_graph_enabled"] = True

    def disable_cuda_graph(self) -> None:
        """Run the loop eagerly again and free the captured graphs."""
        self.__dict__["_cuda_graph_enabled"] = False
        self.__dict__.pop("_cuda_graphs", None)

    @property
    def cuda_graph_enabled(self) -> bool:
        """Whether :meth:`enable_cuda_graph` is on."""
        return bool(self.__dict__.get("_cuda_graph_enabled", False))

    def _graphed(self, fn: Callable[..., Any], name: str, *models: Any) -> tuple[Callable[..., Any], bool]:
        """``(fn, False)`` eagerly, or ``(graphed fn, True)`` under :meth:`enable_cuda_graph`. The graphs
        are kept per ``name`` while ``models`` are the same objects, on the same device and dtype."""
        if not self.cuda_graph_enabled:
            return fn, False
        owners = tuple((id(m), _first_weight(m)) for m in models)
        graphs = self.__dict__.setdefault("_cuda_graphs", {})
        held = graphs.get(name)
        if held is None or held[0] != owners:
            held = graphs[name] = (owners, CUDAGraphCallable(fn, name=f"{type(self).__name__} {name}"))
        return held[1], True
