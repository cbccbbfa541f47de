"""Run-time choices of the denoising loop: CUDA graphs of the model call, and the latents' memory layout.

Neither is ever saved with a pipeline (DESIGN.md, decision 8).

- **CUDA graphs**: :class:`ModelCallGraphs` captures a loop's model call (with classifier-free
  guidance) once per input signature (shapes, dtypes, layout, the non-tensor arguments) through
  :class:`fusediff.utils.cuda_graph.CUDAGraphCallable` and replays it on every later step and
  loop. Conditions, the timestep and the guidance scale are tensor inputs, so new prompts, seeds,
  scales and step counts replay the same graph. The scheduler update runs after each replay as
  one fused launch with coefficients passed by value. Where capture is impossible (CPU tensors,
  an op that reads the device) the call runs eagerly, with a warning.
  :class:`SamplingRuntime` is the pipelines' switch (``pipe.enable_cuda_graph()``): it keeps one
  :class:`ModelCallGraphs` per model call while the models are the same objects, on the same
  device and dtype.
- **Layout**: a model converted with ``model.to(memory_format=torch.channels_last)`` gets its
  latents in channels-last too (:func:`module_memory_format`, :func:`in_layout`), so no step
  copies between layouts.

- **Whole-loop CUDA graphs** (``pipe.enable_cuda_graph(whole_loop=True)``): the model calls and the
  scheduler updates of a whole call as one graph, :class:`~fusediff.sampling.LoopGraphs`
  (:mod:`fusediff.sampling.loop_graph`).

Limits of the per-step graphs: the scheduler update is not inside the graph. The schedulers keep their multistep history
and draw their noise in Python between model calls; the update itself is one kernel on a few
hundred kilobytes whose launch overlaps the model's work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..models.layout import memory_format_of
from ..utils.cuda_graph import CUDAGraphCallable


def module_memory_format(module: Any) -> torch.memory_format:
    """The layout of ``module``'s first 4-D weight with more than one element per filter (its
    convolutions' layout): ``torch.channels_last`` or ``torch.contiguous_format``."""
    if isinstance(module, torch.nn.Module):
        for p in module.parameters():
            if p.dim() == 4 and p.shape[1] * p.shape[2] * p.shape[3] > 1:
                return memory_format_of(p)
    return torch.contiguous_format


def in_layout(x: torch.Tensor, layout: Any) -> torch.Tensor:
    """``x`` (B, C, H, W) in channels-last if ``layout`` is ``torch.channels_last`` or a module whose
    convolutions are (a copy only if it is not yet); otherwise ``x`` as it is, so that a contiguous
    model sees the tensors diffusers would give it."""
    fmt = layout if isinstance(layout, torch.memory_format) else module_memory_format(layout)
    if x.dim() != 4 or fmt != torch.channels_last:
        return x
    return x.contiguous(memory_format=torch.channels_last)


class ModelCallGraphs:
    """CUDA graphs of one loop's model call, kept across loops.

    The first :meth:`wrap` binds the model-call function; later loops get the same
    :class:`CUDAGraphCallable`, which captures per input signature and replays. Pass one object to
    the loops of one model call only (a pipeline keeps one per model, :class:`SamplingRuntime`).
    """

    def __init__(self, name: str = "model call") -> None:
        self.name = name
        self._graphed: CUDAGraphCallable | None = None

    @property
    def num_graphs(self) -> int:
        """How many input signatures have a captured graph."""
        return 0 if self._graphed is None else self._graphed.num_graphs

    def wrap(self, fn: Callable[..., Any]) -> CUDAGraphCallable:
        """``fn`` replayed from CUDA graphs (the function bound by the first call)."""
        if self._graphed is None:
            self._graphed = CUDAGraphCallable(fn, name=self.name)
        return self._graphed

    def reset(self) -> None:
        """Forget every graph: the next call captures again."""
        self._graphed = None


def _first_weight(module: Any) -> tuple[int, str, str] | None:
    """Address, device and dtype of a module's first parameter: they change when the module is moved,
    cast, converted to another layout or given new weight tensors, which a captured graph would miss."""
    if isinstance(module, torch.nn.Module):
        for p in module.parameters():
            return p.data_ptr(), str(p.device), str(p.dtype)
    return None


class SamplingRuntime:
    """Mixin of :class:`~fusediff.pipelines.DiffusionPipeline`: the CUDA-graph switch and its graphs."""

    def enable_cuda_graph(self, whole_loop: bool = False) -> None:
        """Replay each denoising step's model call (and guidance) from a CUDA graph.

        The first call with a new shape, dtype, layout or batch captures a graph (it costs about
        one extra step); later calls with the same shapes replay it, whatever the prompt, seed,
        guidance scale or step count. Replacing a model (``pipe.unet = ...``), moving, casting or
        converting it to another layout captures anew; weights updated in place are seen by the
        graph. Outputs equal the eager loop's. On a CPU, or where capture fails, the loop runs
        eagerly with a warning.

        With ``whole_loop=True`` the whole denoising loop (every step's model call and scheduler
        update) is one graph per loop signature (scheduler, step count, shapes;
        :mod:`fusediff.sampling.loop_graph`): the first call of a signature runs eagerly, the second
        captures, later ones replay. Loops it cannot hold (img2img, inpainting, step callbacks) use
        the per-step graphs.
        """
        if not isinstance(whole_loop, bool):
            raise TypeError(f"whole_loop must be a bool; got {whole_loop!r}")
        if self.__dict__.get("_cuda_graph_whole_loop", False) != whole_loop:
            self.__dict__.pop("_cuda_graphs", None)
        self.__dict__["_cuda_graph_enabled"] = True
        self.__dict__["_cuda_graph_whole_loop"] = whole_loop

    def disable_cuda_graph(self) -> None:
        """Run the loop eagerly again and free the captured graphs."""
        self.__dict__["_cuda_graph_enabled"] = False
        self.__dict__["_cuda_graph_whole_loop"] = False
        self.__dict__.pop("_cuda_graphs", None)

    @property
    def cuda_graph_enabled(self) -> bool:
        """Whether :meth:`enable_cuda_graph` is on."""
        return bool(self.__dict__.get("_cuda_graph_enabled", False))

    def model_call_graphs(self, name: str, *models: Any) -> Any:
        """The graphs of model call ``name`` under :meth:`enable_cuda_graph` (None when it is off): a
        :class:`ModelCallGraphs`, or a :class:`~fusediff.sampling.LoopGraphs` with ``whole_loop``; kept
        while ``models`` are the same objects, on the same device and dtype."""
        if not self.cuda_graph_enabled:
            return None
        owners = tuple((id(m), _first_weight(m)) for m in models)
        graphs = self.__dict__.setdefault("_cuda_graphs", {})
        held = graphs.get(name)
        if held is None or held[0] != owners:
            label = f"{type(self).__name__} {name}"
            if self.__dict__.get("_cuda_graph_whole_loop", False):
                from .loop_graph import LoopGraphs

                held = graphs[name] = (owners, LoopGraphs(label))
            else:
                held = graphs[name] = (owners, ModelCallGraphs(label))
        return held[1]
