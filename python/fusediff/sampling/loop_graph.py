"""Whole-loop CUDA graphs: every step of a sampling call, model and scheduler update, replayed as one graph.

With per-step graphs (:class:`~fusediff.sampling.ModelCallGraphs`) the model call replays from a graph
and the scheduler update runs after it in Python; the host still walks the loop, one replay and one
fused update per step. :class:`LoopGraphs` captures the whole loop instead: the start from noise,
each step's ``scale_model_input``, guided model call and ``scheduler.step``, so an N-step call
replays as a single graph. Each step's coefficients are baked into its fused update as the eager
step passes them (by value), and a multistep scheduler's history (its previous model outputs) lives
in the graph's own memory, at the addresses the capture gave it, so the history is static buffers
without any change to the schedulers.

A loop's *signature* is what the graph fixes: the scheduler's class, config and host tables
(timesteps, sigmas: :func:`scheduler_signature`), the shapes, dtypes and strides of the noise and of
the model's tensor inputs, the non-tensor arguments, the step's ``eta``, and the kind of generator. The first call of a signature runs eagerly (it also
warms up autotuning and lazy allocations), the second captures the loop and replays it, later ones
replay. What varies between calls without a new capture is tensor data: the noise (the seed), the
prompt embeddings, the guidance scale.

Outputs equal the eager loop's bit for bit (the same kernels on the same inputs). The output is a
copy (the graph's buffer is overwritten by the next replay).

Limits: a loop that cannot be one graph runs with per-step graphs (:attr:`LoopGraphs.step_graphs`):
img2img and inpainting starts, mask blending, ``callback_on_step_end``, differentiable sampling, and
tensors among the step's keyword arguments. A capture that fails (a host synchronisation, or noise
drawn on the CPU by a stochastic scheduler: replaying its copy would repeat the capture's numbers,
so :func:`fusediff.utils.torch_utils.to_device` refuses it during a capture) puts the scheduler's
state back and leaves that signature eager, with a warning; a stochastic scheduler captures when its
generator is a CUDA ``torch.Generator``: the capture's generator is registered with the graph, and
each replay draws from the call's own generator (its state is handed to the registered one and
back), so a fresh ``torch.Generator("cuda").manual_seed(s)`` per call gives eager's numbers.
The progress bar advances once, at the end.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..utils.cuda_graph import _EAGER, _copy_in, _first_line, _one_cuda_device, _static_copy, _tensors, capture, freeze
from .runtime import ModelCallGraphs

logger = logging.getLogger(__name__)


def generator_kind(generator: Any) -> Any:
    """What a loop signature keeps of a step's generator: None, or the device type(s) of the generator(s)."""
    if generator is None:
        return None
    if isinstance(generator, (list, tuple)):
        return tuple(generator_kind(g) for g in generator)
    return getattr(getattr(generator, "device", None), "type", type(generator).__name__)


def generators_of(generator: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects among ``generator`` (one, a list, or None)."""
    gens = generator if isinstance(generator, (list, tuple)) else [generator]
    return [g for g in gens if isinstance(g, torch.Generator)]


def scheduler_signature(scheduler: Any) -> tuple:
    """The scheduler's class, config and host tables (its sigmas, timesteps and the like, by content:
    the graph bakes each step's coefficients in), or its identity when it has no config."""
    config = getattr(scheduler, "config", None)
    if config is None:
        return (type(scheduler).__qualname__, id(scheduler))
    tables = []
    for name, value in sorted(vars(scheduler).items()):
        if isinstance(value, torch.Tensor) and value.device.type == "cpu":
            tables.append((name, value.dtype, tuple(value.shape), hash(value.contiguous().numpy().tobytes())))
        elif isinstance(value, np.ndarray):
            tables.append((name, value.dtype.str, value.shape, hash(value.tobytes())))
    return (type(scheduler).__qualname__, repr(sorted(dict(config).items())), tuple(tables))


class _Loop:
    """One captured loop: its graph, static inputs and static output."""

    def __init__(self, graph: torch.cuda.CUDAGraph, args: tuple, output: torch.Tensor,
                 generators: Sequence[torch.Generator]) -> None:
        self.graph, self.args, self.output = graph, args, output
        self.inputs = _tensors(args)
        self.generators = list(generators)  # the CUDA generators registered with the graph

    def replay(self, generators: Sequence[torch.Generator]) -> None:
        """Replay, drawing from ``generators`` (this call's) as the capture drew from its own: their
        states go into the registered generators first and come back, advanced, after."""
        pairs = [(mine, given) for mine, given in zip(self.generators, generators) if mine is not given]
        for mine, given in pairs:
            mine.set_state(given.get_state())
        self.graph.replay()
        for mine, given in pairs:
            given.set_state(mine.get_state())


class LoopGraphs:
    """Whole sampling loops of one model call replayed from CUDA graphs, one per loop signature.

    Pass one object to the loops of one model (a pipeline keeps one per model, as for
    :class:`~fusediff.sampling.ModelCallGraphs`); loops that cannot be one graph use
    :attr:`step_graphs`, the per-step graphs of the same model call.
    """

    def __init__(self, name: str = "denoising loop") -> None:
        self.name = name
        self.step_graphs = ModelCallGraphs(f"{name} (per step)")
        self._loops: dict[tuple, Any] = {}
        self._seen: set[tuple] = set()
        self._pool = None

    @property
    def num_graphs(self) -> int:
        """How many loop signatures have a captured graph."""
        return sum(1 for e in self._loops.values() if e is not _EAGER)

    def reset(self) -> None:
        """Forget every graph (and its memory), the per-step ones included."""
        self._loops.clear()
        self._seen.clear()
        self._pool = None
        self.step_graphs.reset()

    def signature(self, *parts: Any, args: tuple) -> tuple:
        """The key of a loop: ``parts`` and ``args``, tensors by their geometry (:func:`freeze`)."""
        return freeze((parts, args))

    def run(self, key: tuple, body: Callable[..., torch.Tensor], args: tuple, *,
            scheduler: Any = None, generators: Sequence[torch.Generator] = ()) -> torch.Tensor:
        """``body(*args)``: eagerly the first time ``key`` is seen, captured and replayed after.

        ``scheduler`` (any object whose attributes the loop changes) is put back as it was before a
        capture that fails, and the loop then runs eagerly; ``generators`` are the ``torch.Generator``
        objects the loop draws from (the CUDA ones are registered with the graph; all are put back if
        a capture fails)."""
        entry = self._loops.get(key)
        if entry is _EAGER or (entry is None and key not in self._seen):
            self._seen.add(key)
            return body(*args)
        if entry is None:
            try:  # a failed capture leaves the scheduler mid-loop: keep its state to put back
                saved = None if scheduler is None else copy.deepcopy(vars(scheduler))
            except Exception as err:  # noqa: BLE001 - any object the scheduler holds may refuse a copy
                self._loops[key] = self._fallback(f"the scheduler's state cannot be copied: {err}")
                return body(*args)
            entry = self._loops[key] = self._capture(body, args, generators)
            if entry is _EAGER:
                if saved is not None:
                    vars(scheduler).clear()
                    vars(scheduler).update(saved)
                return body(*args)
        else:
            _copy_in(entry.inputs, _tensors(args))
        entry.replay([g for g in generators if g.device.type == "cuda"])
        return entry.output.clone()

    def _fallback(self, reason: str) -> object:
        warnings.warn(f"{self.name}: the loop cannot be one CUDA graph ({reason}); this loop runs eagerly",
                      RuntimeWarning, stacklevel=5)
        return _EAGER

    def _capture(self, body: Callable[..., torch.Tensor], args: tuple, generators: Sequence[torch.Generator]) -> Any:
        device = _one_cuda_device(_tensors(args))
        if isinstance(device, str):
            return self._fallback(device)
        static = _static_copy(args)
        # a failed capture may have drawn numbers already: put every generator back as it was
        cpu_state, cuda_state = torch.get_rng_state(), torch.cuda.get_rng_state(device)
        own = [(g, g.get_state()) for g in generators]
        with torch.cuda.device(device):
            try:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                for g in generators:
                    if g.device.type == "cuda":
                        graph.register_generator_state(g)
                with capture(graph, self._pool):
                    output = body(*static)
            except RuntimeError as err:
                logger.debug("%s: loop capture failed", self.name, exc_info=True)
                torch.cuda.synchronize(device)
                torch.set_rng_state(cpu_state)
                torch.cuda.set_rng_state(cuda_state, device)
                for g, state in own:
                    g.set_state(state)
                return self._fallback(_first_line(err))
        if not isinstance(output, torch.Tensor):
            return self._fallback(f"the loop returned {type(output).__name__}, not a tensor")
        logger.debug("%s: captured loop signature %d", self.name, len(self._loops) + 1)
        return _Loop(graph, static, output, [g for g in generators if g.device.type == "cuda"])
