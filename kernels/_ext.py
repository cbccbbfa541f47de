"""Lazy access to the compiled extension ``fusediff._C`` (pybind11, no libtorch).

Importing ``fusediff.kernels`` never needs the extension; the fused ops load it on first use.
A build without it (or without its CUDA part) still runs every op through its reference.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("fusediff._C"), ""
    except ImportError as err:  # not built, or built for another Python
        return None, f"{type(err).__name__}: {err}"


def extension() -> ModuleType | None:
    """The compiled module, or None when it cannot be imported."""
    return _load()[0]


@functools.lru_cache(maxsize=None)  # a raise is not cached, so a failure is re-reported each call
def require(cuda: bool = False) -> ModuleType:
    """The compiled module; raises RuntimeError saying why when it (or its CUDA part) is missing."""
    mod, why = _load()
    if mod is None:
        raise RuntimeError(
            "the fused kernels need the compiled extension fusediff._C, which failed to import "
            f"({why}); reinstall fusediff with a C++ compiler, or use FUSEDIFF_KERNELS=ref"
        )
    from .scheduler_step_coeffs import NUM_COEFFS

    if getattr(mod, "NUM_COEFFS", None) != NUM_COEFFS:
        raise RuntimeError(
            f"fusediff._C ({getattr(mod, '__file__', '?')}) is from another build of fusediff: it reads "
            f"{getattr(mod, 'NUM_COEFFS', '?')} step coefficients, this Python code passes {NUM_COEFFS}; "
            "reinstall fusediff so that the extension and the Python package match, or use FUSEDIFF_KERNELS=ref"
        )
    if cuda and not mod.cuda_built():
        raise RuntimeError(
            "fusediff._C was built without CUDA (no CUDA compiler at build time); reinstall "
            "fusediff where nvcc is on PATH, or use FUSEDIFF_KERNELS=ref"
        )
    return mod


@torch.compiler.assume_constant_result
def has_cuda_kernels() -> bool:
    """Whether the compiled extension imports and holds the CUDA kernels."""
    mod = extension()
    return mod is not None and bool(mod.cuda_built())
