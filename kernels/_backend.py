"""Kernel backend selection (DESIGN.md, decision 2).

``auto`` (the default) runs the fused kernel on the CUDA tensors it supports and the PyTorch
reference otherwise; ``fused`` also runs fused code on CPU tensors (the C++ path, or Triton
kernels under ``TRITON_INTERPRET=1``); ``ref`` always runs the reference. The environment
variable ``FUSEDIFF_KERNELS`` sets the default; :func:`use_backend` overrides it within a block.
:func:`_have_triton` and :func:`_interpreting` are the two facts every Triton op's dispatch reads.

Every fused call asks for the backend, so nothing here reads the environment per call:
``FUSEDIFF_KERNELS`` is read on first use and kept (entering :func:`use_backend`, or
:func:`reload_environment`, re-reads it), ``TRITON_INTERPRET`` once at import (Triton itself decides
between its interpreter and the compiler when a kernel is defined, at import).
"""

from __future__ import annotations

import contextlib
import functools
import contextvars
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from types import ModuleType

import torch

BACKENDS = ("auto", "fused", "ref")
ENV_VAR = "FUSEDIFF_KERNELS"

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "fusediff_kernel_backend", default=None
)


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


_env_backend: str | None = None  # $FUSEDIFF_KERNELS as last read; None: not read yet


def _read_environment() -> str:
    global _env_backend
    _env_backend = None  # a bad value raises, now and at every call until it is fixed
    env = os.environ.get(ENV_VAR, "").strip().lower()
    _env_backend = _validate(env, ENV_VAR) if env else "auto"
    return _env_backend


def reload_environment() -> str:
    """Re-read ``FUSEDIFF_KERNELS`` (read once, on first use, otherwise); returns the backend it names."""
    return _read_environment()


@torch.compiler.assume_constant_result
def get_backend() -> str:
    """The backend in force: the innermost :func:`use_backend`, else ``$FUSEDIFF_KERNELS``, else auto.

    Under ``torch.compile`` the choice is read once, at trace time, and baked into the graph.
    """
    name = _override.get()
    if name is not None:
        return name
    return _env_backend or _read_environment()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed block with kernel backend ``name`` (``auto``, ``fused`` or ``ref``)."""
    token = _override.set(_validate(name, "use_backend(name)"))
    global _env_backend
    _env_backend = None  # the block's end falls back to the environment as it is then
    try:
        yield
    finally:
        _override.reset(token)


_HAVE_TRITON = importlib.util.find_spec("triton") is not None  # looked up once, at import


def _have_triton() -> bool:
    """Whether Triton can be imported (it is not on every platform). A module constant, so that
    torch.compile reads it as one (it cannot trace importlib)."""
    return _HAVE_TRITON


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@torch.compiler.assume_constant_result
def _interpreting() -> bool:
    """Whether Triton runs its kernels in its interpreter (TRITON_INTERPRET=1, read at import), on CPU tensors."""
    return _INTERPRET


@functools.lru_cache(maxsize=None)  # a raise is not cached
def triton_module(op: str) -> ModuleType:
    """fusediff.kernels.<op>_triton, imported on first use; a clear error when Triton is missing."""
    try:
        return importlib.import_module(f".{op}_triton", __package__)
    except ImportError as err:
        raise RuntimeError(f"{op}'s fused path needs Triton, which failed to import ({err}); install triton "
                           "or use FUSEDIFF_KERNELS=ref") from err


def needs_grad(tensors) -> bool:
    """Whether autograd is recording and some tensor of ``tensors`` (None allowed) requires a gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def use_triton(x: torch.Tensor, dtypes: tuple, tensors, *, backward: bool = False) -> bool:
    """Whether a call on ``x`` runs an op's Triton kernels (DESIGN.md decision 2): not under the ref
    backend, x's dtype in ``dtypes``, and no tensor of ``tensors`` needing gradients unless the op
    has a fused backward (``backward=True``); CUDA tensors when Triton imports (or backend "fused",
    which then raises), CPU tensors only with backend "fused" under TRITON_INTERPRET=1."""
    backend = get_backend()
    if backend == "ref" or x.dtype not in dtypes:
        return False
    if not backward and needs_grad(tensors):
        return False
    if x.is_cuda:
        return backend == "fused" or _HAVE_TRITON
    return backend == "fused" and x.is_cpu and _interpreting() and _HAVE_TRITON


# --- the ops torch.compile sees: traced into where Triton compiles, opaque elsewhere ---------------------------

# True while the Triton launches now running are traced into a graph (the body of a :func:`kernel_op` under
# torch.compile, make_fx or its fake-tensor shape inference): then _launch records each launch as
# ``torch.library.wrap_triton(kernel)[grid](...)`` and takes scratch memory from ``torch.empty``
_TRACED: contextvars.ContextVar[bool] = contextvars.ContextVar("fusediff_traced_launch", default=False)


def _wrap_triton_enabled() -> bool:
    """torch's switch between tracing wrap_triton launches (True) and running the kernel directly, which a
    triton_op's eager (backend) call turns off."""
    from torch._library.triton import is_wrap_triton_enabled

    return is_wrap_triton_enabled()


def _symbolic(values) -> bool:
    """Whether any argument is symbolic: a SymInt/SymFloat/SymBool, or a tensor with a symbolic size or stride
    (torch.compile with dynamic shapes)."""
    sym = (torch.SymInt, torch.SymFloat, torch.SymBool)
    for v in values:
        if isinstance(v, torch.Tensor):
            if any(isinstance(d, torch.SymInt) for d in (*v.shape, *v.stride())):
                return True
        elif isinstance(v, sym):
            return True
    return False


# "1": torch.compile traces the fused ops (triton_op); unset or "0": they stay opaque custom ops (read at import).
# Opt-in until the traced path has run on a GPU (its tests: tests/kernels/test_inline_ops_cuda.py).
TRACE_OPS_ENV = "FUSEDIFF_TRACE_OPS"
_TRACE_OPS = os.environ.get(TRACE_OPS_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def inline_ops() -> bool:
    """Whether :func:`kernel_op` registers traceable ops (``torch.library.triton_op``): Triton imports and
    compiles kernels (not its interpreter, whose kernels cannot run on the fake tensors of a trace), and
    ``FUSEDIFF_TRACE_OPS=1``."""
    return _HAVE_TRITON and not _INTERPRET and _TRACE_OPS


def kernel_op(name: str, fake: Callable) -> Callable[[Callable], object]:
    """Register ``fn``, whose kernels launch through ``_launch.CachedKernel``, as the op ``name`` (its schema
    from the annotations; no argument mutated), with ``fake`` computing its outputs' metadata.

    Where :func:`inline_ops`, ``name`` is a ``torch.library.triton_op``: torch.compile traces ``fn`` and records
    each launch as ``wrap_triton(kernel)[grid](...)``, so Inductor launches the Triton kernels from its own
    generated code, as it launches its own kernels, with no dispatcher call and no Python launch path per call.
    With symbolic shapes (``dynamic=True``, or the automatic dynamic shapes of a recompile) the launch
    arithmetic cannot run on the trace's symbols, and the trace records ``name + "_opaque"`` instead: the same
    function as a plain custom op that torch.compile calls as an external kernel. Eager calls of either run
    ``fn`` with direct launches. Elsewhere (no Triton, TRITON_INTERPRET=1, or FUSEDIFF_TRACE_OPS unset or 0)
    ``name`` is that plain custom op.
    Returns the op for ``name`` (``torch.library.register_autograd`` takes it)."""

    def register(fn: Callable) -> object:
        inline = inline_ops()
        opaque = torch.library.custom_op(f"{name}_opaque" if inline else name, mutates_args=(),
                                         device_types=("cpu", "cuda"))(fn)
        opaque.register_fake(fake)
        if not inline:
            return opaque

        @functools.wraps(fn)
        def body(*args, **kwargs):
            if not _wrap_triton_enabled():  # an eager call (the triton_op's backend): direct launches
                return fn(*args, **kwargs)
            if _symbolic((*args, *kwargs.values())):
                return opaque(*args, **kwargs)
            token = _TRACED.set(True)
            try:
                return fn(*args, **kwargs)
            finally:
                _TRACED.reset(token)

        return torch.library.triton_op(name, body, mutates_args=())

    return register
