"""Launch a Triton kernel for about the host cost of an ATen op.

``kernel[grid](*args, **meta)`` does a lot of Python on every call: Triton's JITFunction binds the
arguments, computes each one's specialization, formats its compile options as a string for the cache
key, checks the globals the kernel read, builds launch metadata for profiler hooks and has the C
launcher call ``data_ptr()`` and ``cuPointerGetAttribute`` for every tensor; an autotuned kernel adds
a dict of all arguments and a key of dtype strings. That is tens of microseconds per launch.

:class:`CachedKernel` does that work once per *variant* and then calls the compiled kernel's launcher
directly. A variant is keyed on everything Triton specializes on or that fixes the launch: the
current device, each tensor's dtype and whether its data pointer is 16-byte aligned, each other
argument's value (the usual pattern: tensors first, every position of one Python type; a float's type
alone otherwise), and the meta-parameters and compile options by name. Nothing Triton could compile differently is left out of the key, so a hit launches the very
kernel Triton would have launched, with the same arguments (tensors passed as their data pointers).
For an autotuned kernel the first call of a variant runs the autotuner; the variant then holds the
chosen config's compiled kernel and meta-parameters. The grid is never cached: a callable grid is
called with the variant's meta-parameters at every launch, since it may depend on sizes that are not
kernel arguments (attention's grid counts batch x heads, and the batch is no argument).

Triton's own path runs instead under TRITON_INTERPRET=1, when a launch hook is installed (profilers
such as proton see every launch), for Triton versions whose launcher contract was not checked here
(3.4 to 3.6 are: ``CompiledKernel.run(gx, gy, gz, stream, function, packed_metadata, launch_metadata,
enter_hook, exit_hook, *all_params)``), or with ``FUSEDIFF_TRITON_DIRECT_LAUNCH=0`` (read at import).

Inside the body of a traced op (``_backend.kernel_op`` under torch.compile) a launch is recorded as
``torch.library.wrap_triton(kernel)[grid](*args, **meta)`` instead, for Inductor to launch from its own code.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton

from . import _backend

try:
    from triton import knobs as _knobs  # Triton >= 3.4
except ImportError:
    _knobs = None

MAX_VARIANTS = 4096  # per kernel; past this the table is cleared (shapes that never repeat)
CHECKED_TRITON = ((3, 4), (3, 6))  # inclusive range of Triton (major, minor) whose launcher contract is known
DIRECT_ENV = "FUSEDIFF_TRITON_DIRECT_LAUNCH"


def _triton_version() -> tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def _direct_supported() -> bool:
    if os.environ.get(DIRECT_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return _knobs is not None and CHECKED_TRITON[0] <= _triton_version() <= CHECKED_TRITON[1]


_DIRECT = _direct_supported()  # decided once, at import
_TRACEABLE = _backend.inline_ops()  # whether any launch can be traced (else the traced check is skipped)


def _hooks_installed() -> bool:
    """Whether a Triton launch hook is set (then every launch goes through Triton, which calls it)."""
    runtime = _knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` on the host without its cost: in Triton 3.6 it is a constexpr_function,
    whose call unwraps its arguments as constexprs (microseconds per host call)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` on the host, as plain integer arithmetic."""
    return -(-a // b)


def _device(args: Sequence) -> int:
    """The CUDA device index of the first tensor of ``args``; -1 for a CPU tensor."""
    first = args[0]
    if not isinstance(first, torch.Tensor):
        first = next(a for a in args if isinstance(a, torch.Tensor))
    return first.get_device()


def _current_device() -> int:
    return torch._C._cuda_getDevice()


def _stream(device: int) -> int:
    """The raw handle of ``device``'s current CUDA stream (the one a captured graph records)."""
    return torch._C._cuda_getCurrentRawStream(device)


class _Variant:
    """One compiled kernel and what a direct launch of it needs."""

    __slots__ = ("run", "function", "packed_metadata", "tail", "meta")

    def __init__(self, compiled, tail: tuple, meta: dict):
        self.run = compiled.run  # the C launcher (its handles are loaded by the first, Triton-run launch)
        self.function = compiled.function
        self.packed_metadata = compiled.packed_metadata
        self.tail = tail  # the kernel's trailing parameters (constexprs) in signature order
        # the meta-parameters (an autotuned kernel's chosen config included) that a callable grid is given:
        # the grid is computed at every launch, as it depends on sizes the key may not hold (e.g. the batch)
        self.meta = meta


class CachedKernel:
    """A Triton kernel (``@triton.jit`` function or ``triton.autotune`` over one) launched through a
    per-variant cache of compiled kernels; call it as ``kernel[grid](*args, **meta)``'s shorthand
    ``launch(grid, args, meta)``.

    ``args`` are the kernel's leading parameters, positionally (tensors, ints, floats, None); ``meta``
    holds the rest by name (constexprs, and options such as ``num_warps``); every call of one
    CachedKernel must name the same trailing parameters. ``grid`` is a tuple of one to three ints, or,
    for an autotuned kernel, a callable of the meta-parameters (the chosen config's included).
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self._autotuned = hasattr(kernel, "configs")  # a triton.autotune object
        self._jit = kernel.fn if self._autotuned else kernel  # the JITFunction (under the autotuner)
        self._variants: dict[tuple, _Variant | None] = {}
        # the call sites' argument pattern, learned at the first call: how many leading arguments are
        # tensors, and the Python types of the rest (-1: another pattern was seen; the general key then)
        self._n_tensors: int | None = None
        self._scalar_types: tuple | None = None

    def _learn(self, args: Sequence) -> int:
        n = 0
        while n < len(args) and isinstance(args[n], torch.Tensor):
            n += 1
        types = tuple(type(a) for a in args[n:])
        if self._n_tensors is None:
            self._n_tensors, self._scalar_types = n, types
        if (n, types) != (self._n_tensors, self._scalar_types) or torch.Tensor in types:
            self._n_tensors = -1
        return self._n_tensors

    def _key(self, device: int, args: Sequence, meta: dict) -> tuple[tuple, list]:
        """(variant key, the arguments as the launcher takes them: tensors as data pointers).

        The common pattern (tensors first, then ints, floats, bools, None, each position always of one
        type; checked at every miss) keys on the tensors' dtypes and alignment and the other arguments'
        values, with two list comprehensions; any other pattern takes the general per-argument loop,
        which keys floats on their type alone."""
        n = self._n_tensors
        if n is not None and n >= 0:
            try:
                ptrs = [t.data_ptr() for t in args[:n]]
                dtypes = [t.dtype for t in args[:n]]
            except AttributeError:  # not a tensor where the pattern has one: the general key (a miss)
                pass
            else:
                scalars = args[n:]
                return (device, *dtypes, *[p & 15 == 0 for p in ptrs], *scalars, *meta.items()), [*ptrs, *scalars]
        key: list[Any] = [device]
        values: list[Any] = []
        for a in args:
            if isinstance(a, torch.Tensor):
                ptr = a.data_ptr()
                values.append(ptr)
                key.append(a.dtype)
                key.append(ptr & 15 == 0)
            else:
                values.append(a)
                key.append(a if type(a) is int else type(a))  # floats and None: their type alone
        key.extend(meta.items())
        return tuple(key), values

    def launch(self, grid: tuple | Callable, args: Sequence, meta: dict) -> None:
        """Launch the kernel on the current stream of the tensors' device (the first tensor's); inside a traced
        op (``_backend.kernel_op`` under torch.compile), record the launch for torch.compile instead."""
        if _TRACEABLE and _backend._TRACED.get():
            torch.library.wrap_triton(self.kernel)[grid](*args, **meta)
            return
        device = _device(args) if _DIRECT and not _backend._interpreting() else -1
        if device < 0:  # the interpreter, CPU tensors (Triton's own error), or no direct launch
            self.kernel[grid](*args, **meta)
            return
        if device != _current_device():
            with torch.cuda.device(device):
                return self.launch(grid, args, meta)
        key, values = self._key(device, args, meta)
        variant = self._variants.get(key, False)
        if variant is False or variant is None or _hooks_installed():
            compiled = self.kernel[grid](*args, **meta)
            if variant is False:
                before = self._n_tensors
                if self._learn(args) != before:  # the first call, or a new argument pattern: key anew
                    self._variants.clear()
                    key, _ = self._key(device, args, meta)
                self._remember(key, compiled, len(args), meta)
            return
        g = grid(variant.meta) if callable(grid) else grid
        variant.run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1, _stream(device), variant.function,
                    variant.packed_metadata, None, None, None, *values, *variant.tail)

    def _remember(self, key: tuple, compiled, n_args: int, meta: dict) -> None:
        """Store the variant Triton just compiled and launched; None (Triton's path for good) when its
        launch cannot be reproduced here."""
        if len(self._variants) >= MAX_VARIANTS:
            self._variants.clear()
        if hasattr(compiled, "result"):  # an async compile's future
            compiled = compiled.result()
        if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
            self._variants[key] = None
            return
        params = dict(meta)
        if self._autotuned:
            config = self.kernel.best_config
            if config.pre_hook is not None:  # run by the autotuner before each launch
                self._variants[key] = None
                return
            params.update(config.kwargs)
        names = self._jit.arg_names[n_args:]
        defaults = self._jit.signature.parameters
        try:
            tail = tuple(params[n] if n in params else defaults[n].default for n in names)
        except KeyError:
            self._variants[key] = None
            return
        if any(v is inspect.Parameter.empty for v in tail):
            self._variants[key] = None
            return
        self._variants[key] = _Variant(compiled, tail, params)

    def variants(self) -> int:
        """How many variants are cached (for tests and benchmarks)."""
        return sum(v is not None for v in self._variants.values())


_SCRATCH: dict[tuple[int, str], torch.Tensor] = {}


def scratch(like: torch.Tensor, name: str, numel: int) -> torch.Tensor:
    """A float32 buffer of at least ``numel`` elements on ``like``'s device, for temporaries that one call's
    kernels write and read (never returned to the caller).

    On CUDA, on the device's default stream, it is kept per (device, name) and reused by the next call:
    kernels on one stream run in order, so a call never overwrites what an earlier call's kernels still read.
    On any other stream a fresh buffer comes from the caching allocator: the warm-up and capture of CUDA
    graphs (ours, ``torch.cuda.graph``'s recipe, and torch.compile's ``mode="reduce-overhead"``, which checks
    that nothing outlives a recording in its memory pool) run on a side stream whose allocations may belong
    to a graph's pool, where a kept buffer must not stay (CUDA cannot capture the default stream). A buffer
    is replaced by a larger one when a call needs more, and kept until the process ends (at most what the
    largest call needed). In a traced op (torch.compile) it is a fresh ``torch.empty``, which the compiled graph
    allocates and frees as it does its own buffers.
    """
    traced = _TRACEABLE and _backend._TRACED.get()
    if traced or not like.is_cuda or torch._C._cuda_getCurrentRawStream(like.get_device()) != 0:
        return torch.empty(numel, dtype=torch.float32, device=like.device)
    key = (like.get_device(), name)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[key] = torch.empty(numel, dtype=torch.float32, device=like.device)
    return buf
