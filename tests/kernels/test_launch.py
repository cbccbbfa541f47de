"""fusediff.kernels._launch.CachedKernel's bookkeeping, on the CPU, with a stand-in for a Triton kernel.

The stand-in records what Triton's own launch path receives and hands back a "compiled kernel" whose
launcher records the direct launches. The tests check that a variant goes through Triton once and
directly afterwards, with the arguments Triton would have passed (tensors as their data pointers,
the constexprs in signature order); that every fact Triton specializes on (dtype, 16-byte alignment,
int values, meta-parameters) separates variants; that an autotuned kernel's variant keeps its chosen
config and grid; and the fallbacks (interpreter, launch hooks, unreproducible variants). The real
kernels' direct launches are compared with Triton's on the GPU in test_launch_cuda.py.
"""

from __future__ import annotations

import importlib
import inspect
from types import SimpleNamespace

import pytest
import torch

L = importlib.import_module("fusediff.kernels._launch")
_backend = importlib.import_module("fusediff.kernels._backend")


def _kernel_signature(X, Y, n, eps, BLOCK, FLAG=False):  # the stand-in's parameters, as a @triton.jit has them
    pass


class FakeCompiled:
    def __init__(self, log):
        self.log = log
        self.function = "fn-handle"
        self.packed_metadata = "packed"

    def run(self, *args):
        self.log.append(("direct", args))


class FakeJIT:
    """What CachedKernel reads of a JITFunction: arg_names, signature, kernel[grid](*args, **meta)."""

    def __init__(self):
        self.arg_names = list(inspect.signature(_kernel_signature).parameters)
        self.signature = inspect.signature(_kernel_signature)
        self.log = []
        self.compiled = {}

    def __getitem__(self, grid):
        def call(*args, **meta):
            self.log.append(("triton", grid, args, meta))
            key = repr(meta)
            return self.compiled.setdefault(key, FakeCompiled(self.log))
        return call


class FakeAutotuner(FakeJIT):
    """An autotune object: configs, the JITFunction as .fn, best_config set by the launch."""

    def __init__(self):
        super().__init__()
        self.fn = self
        self.configs = ["a", "b"]
        self.best_config = SimpleNamespace(kwargs={"BLOCK": 64}, pre_hook=None)

    def __getitem__(self, grid):
        inner = super().__getitem__(grid)

        def call(*args, **meta):
            out = inner(*args, **meta, **self.best_config.kwargs)
            self.log[-1] = ("triton", grid(dict(meta, **self.best_config.kwargs)), args, meta)
            return out
        return call


@pytest.fixture
def direct(monkeypatch):
    """Direct launches on, as on a CUDA device 0 (the CPU tensors stand for device tensors)."""
    monkeypatch.setattr(L, "_DIRECT", True)
    monkeypatch.setattr(_backend, "_interpreting", lambda: False)
    monkeypatch.setattr(L, "_device", lambda args: 0)
    monkeypatch.setattr(L, "_current_device", lambda: 0)
    monkeypatch.setattr(L, "_stream", lambda device: 1234)
    monkeypatch.setattr(L, "_hooks_installed", lambda: False)


def _kinds(log):
    return [entry[0] for entry in log]


def test_second_call_is_direct_with_tritons_arguments(direct):
    jit = FakeJIT()
    k = L.CachedKernel(jit)
    x, y = torch.zeros(8), torch.zeros(8)
    for _ in range(3):
        k.launch((4, 2), (x, y, 8, 1e-5), dict(BLOCK=16, num_warps=2))
    print(_kinds(jit.log))
    assert _kinds(jit.log) == ["triton", "direct", "direct"]
    args = jit.log[1][1]
    # grid padded to three, the stream, the handle, packed metadata, no launch metadata or hooks,
    # then every parameter: tensors as data pointers, scalars as given, constexprs (FLAG's default too)
    assert args == (4, 2, 1, 1234, "fn-handle", "packed", None, None, None,
                    x.data_ptr(), y.data_ptr(), 8, 1e-5, 16, False), args
    assert k.variants() == 1


def test_everything_triton_specializes_on_makes_a_new_variant(direct):
    jit = FakeJIT()
    k = L.CachedKernel(jit)
    base = torch.zeros(64)
    x, y = base[:8], torch.zeros(8)
    calls = [
        ((x, y, 8, 1e-5), dict(BLOCK=16)),
        ((x, torch.zeros(8), 8, 1e-5), dict(BLOCK=16)),  # other tensors, same dtypes and alignment: same variant
        ((base[1:9], y, 8, 1e-5), dict(BLOCK=16)),  # x no longer 16-byte aligned
        ((x.half(), y, 8, 1e-5), dict(BLOCK=16)),  # another dtype
        ((x, y, 16, 1e-5), dict(BLOCK=16)),  # another int value
        ((x, y, 8, 2e-5), dict(BLOCK=16)),  # another float value (keyed on values in the common pattern)
        ((x, y, 8, 1e-5), dict(BLOCK=32)),  # another constexpr
        ((x, y, 8, 1e-5), dict(BLOCK=16, num_warps=8)),  # another compile option
        ((x, y, 8, 1e-5), dict(BLOCK=16)),  # the first variant again
    ]
    for args, meta in calls:
        k.launch((1,), args, meta)
    print(_kinds(jit.log))
    assert _kinds(jit.log) == ["triton", "direct"] + ["triton"] * 6 + ["direct"]
    assert k.variants() == 7


def test_another_argument_pattern_takes_the_general_key(direct):
    """A None where the pattern had a tensor, then a tensor among the scalars: the kernel switches to the
    general per-argument key, and its direct launches still pass every tensor as its data pointer."""
    jit = FakeJIT()
    k = L.CachedKernel(jit)
    x, y = torch.zeros(8), torch.zeros(8)
    k.launch((1,), (x, y, 8, 1e-5), dict(BLOCK=16))
    k.launch((1,), (x, None, 8, 1e-5), dict(BLOCK=16))  # a new pattern: the general key from now on
    assert k._n_tensors == -1
    for eps in (1e-5, 3e-5):  # the general key: a float's type, not its value
        k.launch((1,), (x, None, 8, eps), dict(BLOCK=16))
    k.launch((1,), (x, y, 8, 1e-5), dict(BLOCK=16))
    k.launch((1,), (x, y, 8, 1e-5), dict(BLOCK=16))
    print(_kinds(jit.log))
    assert _kinds(jit.log) == ["triton", "triton", "direct", "direct", "triton", "direct"]
    assert jit.log[-1][1][9:11] == (x.data_ptr(), y.data_ptr())


def test_autotuned_variant_keeps_config_and_grid(direct):
    tuner = FakeAutotuner()
    k = L.CachedKernel(tuner)
    x, y = torch.zeros(8), torch.zeros(8)
    grid = lambda m: (100 // m["BLOCK"] + 1,)  # noqa: E731
    k.launch(grid, (x, y, 8, 1.0), dict(FLAG=True))
    tuner.best_config = SimpleNamespace(kwargs={"BLOCK": 8}, pre_hook=None)  # a later tuning elsewhere
    k.launch(grid, (x, y, 8, 1.0), dict(FLAG=True))
    print(tuner.log)
    assert _kinds(tuner.log) == ["triton", "direct"]
    args = tuner.log[1][1]
    assert args[:3] == (2, 1, 1), "the grid of the config chosen for this variant (BLOCK=64)"
    assert args[-2:] == (64, True), "constexprs in signature order: BLOCK from the config, FLAG from meta"


def test_fallbacks_go_through_triton(direct, monkeypatch):
    x, y = torch.zeros(8), torch.zeros(8)
    jit = FakeJIT()
    k = L.CachedKernel(jit)
    k.launch((1,), (x, y, 8, 1.0), dict(BLOCK=16))
    monkeypatch.setattr(L, "_hooks_installed", lambda: True)  # a profiler's launch hook
    k.launch((1,), (x, y, 8, 1.0), dict(BLOCK=16))
    monkeypatch.setattr(L, "_hooks_installed", lambda: False)
    monkeypatch.setattr(_backend, "_interpreting", lambda: True)  # TRITON_INTERPRET=1
    k.launch((1,), (x, y, 8, 1.0), dict(BLOCK=16))
    monkeypatch.setattr(_backend, "_interpreting", lambda: False)
    monkeypatch.setattr(L, "_DIRECT", False)  # FUSEDIFF_TRITON_DIRECT_LAUNCH=0 or an unchecked Triton
    k.launch((1,), (x, y, 8, 1.0), dict(BLOCK=16))
    monkeypatch.setattr(L, "_DIRECT", True)
    k.launch((1,), (x, y, 8, 1.0), dict(BLOCK=16))
    print(_kinds(jit.log))
    assert _kinds(jit.log) == ["triton", "triton", "triton", "triton", "direct"]


def test_unreproducible_variants_stay_on_tritons_path(direct):
    x, y = torch.zeros(8), torch.zeros(8)
    jit = FakeJIT()
    jit.compiled["{'BLOCK': 16}"] = object()  # a compiled kernel without run/function/packed_metadata
    k = L.CachedKernel(jit)
    for _ in range(2):
        k.launch((1,), (x, y, 8, 1.0), dict(BLOCK=16))
    tuner = FakeAutotuner()
    tuner.best_config = SimpleNamespace(kwargs={"BLOCK": 64}, pre_hook=lambda args: None)  # runs per launch
    t = L.CachedKernel(tuner)
    for _ in range(2):
        t.launch(lambda m: (1,), (x, y, 8, 1.0), {})
    missing = L.CachedKernel(FakeJIT())  # BLOCK (no default) not passed: the tail cannot be built
    for _ in range(2):
        missing.launch((1,), (x, y, 8, 1.0), {})
    print(_kinds(jit.log), _kinds(tuner.log), _kinds(missing.kernel.log))
    assert _kinds(jit.log) == _kinds(tuner.log) == _kinds(missing.kernel.log) == ["triton", "triton"]
    assert k.variants() == t.variants() == missing.variants() == 0


def test_scratch_on_cpu_is_fresh():
    x = torch.zeros(4)
    a, b = L.scratch(x, "t", 10), L.scratch(x, "t", 10)
    assert a.dtype == torch.float32 and a.numel() == 10 and a.data_ptr() != b.data_ptr()
