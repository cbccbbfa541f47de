"""The ops ``_backend.kernel_op`` registers, on the CPU. With FUSEDIFF_TRACE_OPS=1 (read at import, so those
checks run in a child interpreter) and Triton compiling (not its interpreter), each fused op is a triton_op whose
trace records its Triton launches (fake CUDA tensors: no GPU needed to trace), with an opaque twin for
symbolic shapes; otherwise a plain custom op. tests/kernels/test_inline_ops_cuda.py runs the traced ops."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from fusediff import kernels as K  # noqa: F401  (registers the ops)
from fusediff.kernels import _backend

OPS = ("group_norm", "group_norm_fwd", "group_norm_bwd", "attention", "attention_fwd", "attention_bwd", "geglu")
compiles = pytest.mark.skipif(not _backend._HAVE_TRITON or _backend._INTERPRET,
                              reason="the ops are traced into only where Triton compiles kernels (Triton installed, "
                              "TRITON_INTERPRET unset)")


def _child(code: str, trace: str) -> str:
    """stdout of ``code`` run by a fresh interpreter with FUSEDIFF_TRACE_OPS=``trace``; its stderr on failure."""
    env = {**os.environ, "FUSEDIFF_TRACE_OPS": trace}
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, f"child failed:\n{run.stdout}\n{run.stderr}"
    return run.stdout


def test_symbolic_detects_symbols():
    env = ShapeEnv()
    sym = env.create_unbacked_symint()
    assert _backend._symbolic([torch.ones(2, 3), 4, 1.5, None]) is False
    assert _backend._symbolic([torch.ones(2), sym]) is True
    with FakeTensorMode(shape_env=env):
        dyn = torch.empty(sym, 4)
    assert _backend._symbolic([dyn]) is True


@pytest.mark.parametrize("name", OPS)
def test_every_fused_op_is_registered(name):
    op = getattr(torch.ops.fusediff, name)
    assert op.default._schema.name == f"fusediff::{name}"
    assert hasattr(torch.ops.fusediff, f"{name}_opaque") == _backend.inline_ops()


@compiles
def test_trace_ops_registers_opaque_twins():
    code = f"""
        import torch, fusediff.kernels
        from fusediff.kernels import _backend
        print(_backend.inline_ops())
        for name in {OPS!r}:
            op, twin = getattr(torch.ops.fusediff, name), getattr(torch.ops.fusediff, name + "_opaque")
            print(str(twin.default._schema).replace("_opaque", "", 1) == str(op.default._schema))
        """
    assert _child(code, "1").split() == ["True"] * (1 + len(OPS))
    assert _child("from fusediff.kernels import _backend; print(_backend.inline_ops())", "0").split() == ["False"]


@compiles
def test_trace_records_the_triton_launch():
    """AOTAutograd's functional graph of the traced op holds the Triton launch (a triton_kernel_wrapper_functional
    node with the launcher's constexprs), not a call of the op."""
    code = """
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from functorch.compile import aot_function
        import fusediff.kernels

        class Recorded(Exception):
            pass

        graphs = []

        def compiler(gm, _inputs):
            graphs.append(gm.code)

            def run(*_a):
                raise Recorded

            return run

        def fn(x, w):
            return torch.ops.fusediff.group_norm(x, 2, w, w, 1e-5, True, None)

        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.empty(2, 64, 8, 8, device="cuda", dtype=torch.float16)  # one-pass plan: no device query
            w = torch.empty(64, device="cuda", dtype=torch.float16)
            y = fn(x, w)  # the triton_op's fake: its body, tracing the launch
            assert y.shape == x.shape and y.device.type == "cuda" and y.stride() == x.stride(), (y.shape, y.stride())
            try:
                aot_function(fn, fw_compiler=compiler)(x, w)
            except Recorded:
                pass
        print(graphs[0])
        """
    graph = _child(code, "1")
    assert "triton_kernel_wrapper_functional" in graph, graph
    assert "fusediff" not in graph, f"the traced graph should hold the kernel, not the op:\n{graph}"
    for expected in ("'BLOCK_C': 32", "'BLOCK_S': 64", "'SILU': True", "'WRITE_STATS': False"):
        assert expected in graph, f"{expected} missing from the recorded launch:\n{graph}"
