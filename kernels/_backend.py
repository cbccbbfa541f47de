"""Kernel backend selection (DESIGN.md, decision 2).

``auto`` (the default) runs the fused kernel on the CUDA tensors it supports and the PyTorch
reference otherwise; ``fused`` also runs fused code on CPU tensors (the C++ path, or Triton
kernels under ``TRITON_INTERPRET=1``); ``ref`` always runs the reference. The environment
variable ``FUSEDIFF_KERNELS`` sets the default; :func:`use_backend` overrides it within a block.
:func:`_have_triton` and :func:`_interpreting` are the two facts every Triton op's dispatch reads.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from collections.abc import Iterator

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


@torch.compiler.assume_constant_result
def get_backend() -> str:
    """The backend in force: the innermost :func:`use_backend`, else ``$FUSEDIFF_KERNELS``, else auto.

    Under ``torch.compile`` the choice is read once, at trace time, and baked into the graph.
    """
    name = _override.get()
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR)
    if not env:
        return "auto"
    return _validate(env.strip().lower(), ENV_VAR)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed block with kernel backend ``name`` (``auto``, ``fused`` or ``ref``)."""
    token = _override.set(_validate(name, "use_backend(name)"))
    try:
        yield
    finally:
        _override.reset(token)


_HAVE_TRITON = importlib.util.find_spec("triton") is not None  # looked up once, at import


def _have_triton() -> bool:
    """Whether Triton can be imported (it is not on every platform). A module constant, so that
    torch.compile reads it as one (it cannot trace importlib)."""
    return _HAVE_TRITON


@torch.compiler.assume_constant_result
def _interpreting() -> bool:
    """Whether Triton runs its kernels in its interpreter (TRITON_INTERPRET=1), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
