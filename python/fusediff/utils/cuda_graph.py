"""Capture a function of CUDA tensors once per input signature and replay it as a CUDA graph.

A CUDA graph records the kernels one call launches, with their arguments and memory
addresses, and replays them with a single launch (``torch.cuda.CUDAGraph``). Replays read
their inputs from the addresses used at capture, so :class:`CUDAGraphCallable` keeps one set
of static input tensors per signature (shapes, dtypes, strides, device, and the values of
non-tensor arguments), copies each call's inputs into them, replays, and returns the static
outputs. Everything that must vary between replays without a new capture therefore has to
be a tensor argument: a guidance scale as a 0-d tensor, a timestep as a 1-element tensor.

Limits:
- The outputs are the graph's own buffers: the next call overwrites them. Clone what you keep.
- The captured function must be free of host synchronisation (``.item()``, printing values,
  data-dependent Python branches) and of CPU-side randomness; such a capture fails, and the
  signature then runs eagerly from then on, with a warning (as do CPU inputs).
- Parameters and buffers the function reads (a model's weights) are read at their capture
  addresses: replacing a weight tensor (not updating it in place) needs :meth:`reset`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

_EAGER = object()  # marks a signature whose capture failed


@contextlib.contextmanager
def capture(graph: torch.cuda.CUDAGraph, pool: Any = None) -> Iterator[None]:
    """``torch.cuda.graph(graph, pool=pool)`` with Python's cyclic garbage collector paused.

    A collection that runs while the stream is capturing may free an unreachable cycle that holds an
    earlier ``CUDAGraph`` (a pipeline dropped by its user); its destructor calls ``cudaGraphExecDestroy``,
    which is not permitted during a capture, and the capture fails ("operation failed due to a previous
    error during capture"). PyTorch no longer collects before a capture (``force_cudagraph_gc``), so the
    collector stays off until the capture ends; the garbage is collected later as usual.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool):
            yield
    finally:
        if enabled:
            gc.enable()


def freeze(value: Any) -> Any:
    """A hashable stand-in for ``value``: a tensor's geometry, dtype and device (not its data), containers
    element by element, a hashable value as it is, anything else by type and identity."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.stride(), value.dtype, value.device)
    if isinstance(value, dict):
        return ("D", tuple((k, freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(freeze(v) for v in value))
    try:
        hash(value)
    except TypeError:
        return ("id", type(value).__qualname__, id(value))
    return value


def _signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Hashable key of a call: per tensor its geometry and dtype, per other value the value (:func:`freeze`)."""
    return freeze((args, dict(sorted(kwargs.items()))))


def _one_cuda_device(tensors: list[torch.Tensor]) -> torch.device | str:
    """The one CUDA device of ``tensors``, or why there is none (a fallback's reason)."""
    devices = {t.device for t in tensors}
    if not tensors or any(d.type != "cuda" for d in devices) or len(devices) != 1:
        where = ", ".join(sorted(str(d) for d in devices)) or "no tensors"
        return f"its tensors must all be on one CUDA device; got {where}"
    return next(iter(devices))


def _copy_in(statics: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """A replay's inputs into the graph's static tensors (skipped where they are the same memory)."""
    for static, value in zip(statics, values):
        if static.data_ptr() != value.data_ptr():
            static.copy_(value)


def _first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _tensors(values: Any) -> list[torch.Tensor]:
    """The tensors among ``values`` (nested lists, tuples and dicts), in order."""
    if isinstance(values, torch.Tensor):
        return [values]
    if isinstance(values, (list, tuple)):
        return [t for v in values for t in _tensors(v)]
    if isinstance(values, dict):
        return [t for v in values.values() for t in _tensors(v)]
    return []


def _static_copy(values: Any) -> Any:
    """``values`` with every tensor replaced by a fresh copy of the same strides (the static inputs)."""
    if isinstance(values, torch.Tensor):
        return torch.empty_strided(values.shape, values.stride(), dtype=values.dtype,
                                   device=values.device).copy_(values)
    if isinstance(values, (list, tuple)):
        return type(values)(_static_copy(v) for v in values)
    if isinstance(values, dict):
        return {k: _static_copy(v) for k, v in values.items()}
    return values


class _Entry:
    """One captured signature: its graph, static inputs and static outputs."""

    def __init__(self, graph: torch.cuda.CUDAGraph, args: tuple, kwargs: dict, outputs: Any) -> None:
        self.graph = graph
        self.args, self.kwargs = args, kwargs
        self.inputs = _tensors((args, kwargs))  # the static tensors, in call order
        self.outputs = outputs


class CUDAGraphCallable:
    """``fn`` replayed from a CUDA graph per input signature; eager where capture is impossible.

    Args:
        fn: the function to capture; called with the same positional and keyword arguments as
            this object. Its tensor arguments are copied into static buffers on every call.
        warmup: eager calls on a side stream before capture (lazy initialisation, autotuning and
            cuDNN/cuBLAS workspaces must happen outside the capture).
        name: shown in the fallback warning.
    """

    def __init__(self, fn: Callable[..., Any], *, warmup: int = 2, name: str | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"CUDAGraphCallable needs a callable; got {type(fn).__name__}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be a positive int; got {warmup!r}")
        self.fn = fn
        self.warmup = warmup
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self._entries: dict[tuple, Any] = {}
        self._pool = None

    @property
    def num_graphs(self) -> int:
        """How many signatures have a captured graph."""
        return sum(1 for e in self._entries.values() if e is not _EAGER)

    def reset(self) -> None:
        """Forget every graph (and its memory): the next call per signature captures again."""
        self._entries.clear()
        self._pool = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = _signature(args, kwargs)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = self._capture(args, kwargs)
            if entry is _EAGER:
                return self.fn(*args, **kwargs)
            return entry.outputs  # _capture replayed the graph once on copies of these inputs
        if entry is _EAGER:
            return self.fn(*args, **kwargs)
        _copy_in(entry.inputs, _tensors((args, kwargs)))
        entry.graph.replay()
        return entry.outputs

    def _fallback(self, reason: str) -> object:
        warnings.warn(f"{self.name}: CUDA graph capture is not possible ({reason}); running eagerly",
                      RuntimeWarning, stacklevel=4)
        return _EAGER

    def _capture(self, args: tuple, kwargs: dict) -> Any:
        device = _one_cuda_device(_tensors((args, kwargs)))
        if isinstance(device, str):
            return self._fallback(device)
        static_args, static_kwargs = _static_copy(args), _static_copy(kwargs)
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.stream(side):
                    for _ in range(self.warmup):
                        self.fn(*static_args, **static_kwargs)
                torch.cuda.current_stream().wait_stream(side)
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                with capture(graph, self._pool):
                    outputs = self.fn(*static_args, **static_kwargs)
            except RuntimeError as err:  # e.g. a host sync or a CPU tensor inside fn
                logger.debug("%s: capture failed", self.name, exc_info=True)
                torch.cuda.synchronize(device)
                return self._fallback(_first_line(err))
        graph.replay()  # the capture only recorded: produce this call's outputs
        logger.debug("%s: captured a CUDA graph for signature %d", self.name, len(self._entries) + 1)
        return _Entry(graph, static_args, static_kwargs, outputs)
