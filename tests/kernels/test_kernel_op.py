"""The ops ``_backend.kernel_op`` registers, on the CPU: where Triton compiles (not its interpreter), each fused op
is a triton_op whose trace records its Triton launches (fake CUDA tensors: no GPU needed to trace), with an
opaque twin for symbolic shapes; elsewhere a plain custom op. tests/kernels/test_inline_ops_cuda.py runs them."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from fusediff import kernels as K  # noqa: F401  (registers the ops)
from fusediff.kernels import _backend

OPS = ("group_norm", "group_norm_fwd", "group_norm_bwd", "attention", "attention_fwd", "attention_bwd", "geglu")
inline = pytest.mark.skipif(not _backend.inline_ops(), reason="the ops are traced into only where Triton compiles "
                            "kernels (Triton installed, TRITON_INTERPRET unset)")


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
    if _backend.inline_ops():
        twin = getattr(torch.ops.fusediff, f"{name}_opaque")
        assert str(twin.default._schema).replace("_opaque", "", 1) == str(op.default._schema)


class _Recorded(Exception):
    """Raised by the recording compiler in place of running the graph (no CUDA here)."""


def _forward_graph(fn, *args) -> str:
    """The functionalized forward graph AOTAutograd makes of ``fn(*args)`` (fake tensors), as code."""
    from functorch.compile import aot_function

    graphs = []

    def compiler(gm, _inputs):
        graphs.append(gm.code)

        def run(*_a):
            raise _Recorded

        return run

    with pytest.raises(_Recorded):
        aot_function(fn, fw_compiler=compiler)(*args)
    return graphs[0]


@inline
def test_trace_records_the_triton_launch():
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(2, 64, 8, 8, device="cuda", dtype=torch.float16)  # one-pass plan: no device query
        w = torch.empty(64, device="cuda", dtype=torch.float16)
        y = torch.ops.fusediff.group_norm(x, 2, w, w, 1e-5, True, None)  # the triton_op's fake: its body
        assert y.shape == x.shape and y.device.type == "cuda" and y.stride() == x.stride()
        code = _forward_graph(lambda x, w: torch.ops.fusediff.group_norm(x, 2, w, w, 1e-5, True, None), x, w)
    assert "triton_kernel_wrapper_functional" in code, code
    assert "fusediff" not in code, f"the traced graph should hold the kernel, not the op:\n{code}"
    for expected in ("'BLOCK_C': 32", "'BLOCK_S': 64", "'SILU': True", "'WRITE_STATS': False"):
        assert expected in code, f"{expected} missing from the recorded launch:\n{code}"


def test_trace_ops_can_be_turned_off():
    """FUSEDIFF_TRACE_OPS=0 (read at import) keeps every op a plain custom op: no opaque twin is registered."""
    import subprocess
    import sys

    code = ("import torch, fusediff.kernels; from fusediff.kernels import _backend; "
            "print(_backend.inline_ops(), hasattr(torch.ops.fusediff, 'group_norm_opaque'))")
    env = {**__import__("os").environ, "FUSEDIFF_TRACE_OPS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr
