"""With FUSEDIFF_TRACE_OPS=1, under torch.compile (Inductor) the fused ops are traced into (``_backend.kernel_op``:
torch.library.triton_op):
the generated code launches fusediff's Triton kernels itself and calls no ``torch.ops.fusediff`` op, with the
same results as the eager fused call. With dynamic shapes the graph calls the opaque op instead, with the
same results too; a compiled training step (forward and backward) matches the eager fused gradients."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._inductor.utils import run_and_get_code

from fusediff import kernels as K
from fusediff.kernels import _backend

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _backend.inline_ops(), reason="the traced ops are opt-in: FUSEDIFF_TRACE_OPS=1")]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _rand(*shape, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to("cuda", dtype)


def _compiled(fn, *args, dynamic=False):
    """(output, Inductor's generated source) of ``torch.compile(fn, fullgraph=True)(*args)``."""
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    out, code = run_and_get_code(compiled, *args)
    return out, "\n".join(code)


def _check_inlined(code: str, kernel: str) -> None:
    assert "torch.ops.fusediff" not in code, "the compiled code calls a fusediff op instead of its kernels:\n" + code
    assert kernel in code, f"the compiled code does not launch {kernel}:\n" + code


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


GN_CASES = {  # (shape, groups, layout, with add): one-pass and split plans, both layouts
    "one_pass": ((2, 1280, 8, 8), 32, torch.contiguous_format, False),
    "one_pass_add_cl": ((2, 640, 16, 16), 32, torch.channels_last, True),
    "split_cl": ((2, 320, 64, 64), 32, torch.channels_last, False),
    "split_add": ((2, 320, 64, 64), 32, torch.contiguous_format, True),
}


@pytest.mark.parametrize("case", GN_CASES)
def test_group_norm_inlined(case):
    shape, groups, layout, with_add = GN_CASES[case]
    x = _rand(*shape).contiguous(memory_format=layout)
    w, b = _rand(shape[1], seed=1), _rand(shape[1], seed=2)
    add = _rand(shape[0], shape[1], seed=3) if with_add else None

    def fn(x, w, b, add):
        return K.group_norm(x, groups, w, b, 1e-5, "silu", add=add)

    with torch.no_grad():
        eager = fn(x, w, b, add)
        got, code = _compiled(fn, x, w, b, add)
    kernel = "_one_pass_kernel" if case.startswith("one_pass") else "_apply_kernel"
    _check_inlined(code, kernel)
    assert got.stride() == eager.stride()
    assert torch.equal(got, eager), f"compiled != eager fused GroupNorm: max diff {_max_diff(got, eager):.3g}"


@pytest.mark.parametrize("sk", [256, 77])
def test_attention_inlined(sk):
    q, k, v = _rand(2, 8, 256, 40), _rand(2, 8, sk, 40, seed=1), _rand(2, 8, sk, 40, seed=2)

    def fn(q, k, v):
        return K.attention(q, k, v, out_layout="bshd")

    with torch.no_grad():
        eager = fn(q, k, v)
        got, code = _compiled(fn, q, k, v)
    _check_inlined(code, "_attention_fwd_kernel")
    assert got.stride() == eager.stride()
    # the autotuner may pick another tile under Inductor: same math, another summation order
    torch.testing.assert_close(got, eager, rtol=2e-3, atol=2e-3,
                               msg=lambda m: f"compiled vs eager fused attention: {m}")


def test_geglu_inlined():
    x = _rand(2, 256, 2 * 1280)
    with torch.no_grad():
        eager = K.geglu(x)
        got, code = _compiled(K.geglu, x)
    _check_inlined(code, "_geglu_kernel")
    assert torch.equal(got, eager), f"compiled != eager fused GEGLU: max diff {_max_diff(got, eager):.3g}"


def test_dynamic_shapes_call_the_opaque_op():
    def fn(x, w, b):
        return K.group_norm(x, 32, w, b, 1e-5, "silu")

    w, b = _rand(320, seed=1), _rand(320, seed=2)
    with torch.no_grad():
        for batch in (2, 3):
            x = _rand(batch, 320, 16, 16, seed=batch)
            got, code = _compiled(fn, x, w, b, dynamic=True)
            assert "fusediff.group_norm_opaque" in code, "dynamic shapes must call the opaque op:\n" + code
            eager = fn(x, w, b)
            assert torch.equal(got, eager), f"batch {batch}: max diff {_max_diff(got, eager):.3g}"


def test_compiled_training_step_matches_eager():
    x = _rand(2, 320, 32, 32, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    w, b = _rand(320, dtype=torch.float32, seed=1), _rand(320, dtype=torch.float32, seed=2)
    q, k, v = (_rand(2, 8, 64, 40, dtype=torch.float32, seed=s) for s in (3, 4, 5))
    dy = _rand(2, 320, 32, 32, dtype=torch.float32, seed=6)

    def loss(x, w, b, q, k, v):
        y = K.group_norm(x, 32, w, b, 1e-5, "silu")
        return (y * dy).sum() + K.attention(q, k, v).square().sum()

    grads = []
    for run in ("eager", "compiled"):
        leaves = [t.clone().requires_grad_() for t in (x, w, b, q, k, v)]
        fn = loss if run == "eager" else torch.compile(loss, fullgraph=True)
        fn(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for name, e, c in zip(["x", "w", "b", "q", "k", "v"], *grads):
        torch.testing.assert_close(c, e, rtol=1e-3, atol=1e-3, msg=lambda m, n=name: f"grad {n}: {m}")
