"""The direct launch of fusediff.kernels._launch on a CUDA device: for every fused op (forward, and the
backward of group_norm and attention), the output of a direct launch equals, bit for bit, that of the
same call through Triton's own launch path; inputs that change what Triton specializes on (a view
whose data pointer is not 16-byte aligned, another dtype, another shape) after a variant is cached
still give the reference's result; CUDA-graph capture replays direct launches; a Triton launch hook
sees every launch. Marked gpu: skips without CUDA."""

from __future__ import annotations

import importlib

import pytest
import torch

from fusediff import kernels as K

L = importlib.import_module("fusediff.kernels._launch")
pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_direct():
    if not L._DIRECT:
        pytest.skip(f"this Triton ({L.triton.__version__}) launches through its own path only")


def _gen(seed=0):
    return torch.Generator("cuda").manual_seed(seed)


def _rnd(*shape, dtype=torch.float16, seed=0):
    return torch.randn(*shape, generator=_gen(seed), device="cuda", dtype=dtype)


def _triton_path(fn):
    saved, L._DIRECT = L._DIRECT, False
    try:
        return fn()
    finally:
        L._DIRECT = saved


LABELS = ["group_norm one-pass", "group_norm split", "group_norm fwd+bwd", "group_norm fwd+bwd split", "attention",
          "attention fwd+bwd", "timestep_embedding", "timestep_mlp", "geglu"]


def _ops():
    """{label: call} of every fused op at a small shape; each call returns a tensor or a tuple of them."""
    x, w, b = _rnd(2, 64, 8, 8), _rnd(64, seed=1), _rnd(64, seed=2)
    xs = _rnd(2, 320, 64, 64)  # the split plan
    q, k, v = _rnd(2, 4, 100, 40), _rnd(2, 4, 77, 40, seed=1), _rnd(2, 4, 77, 40, seed=2)
    t = torch.tensor([3, 981], device="cuda")
    w1, b1, w2, b2 = (_rnd(*s, seed=i) for i, s in enumerate([(128, 64), (128,), (96, 128), (96,)]))
    h = _rnd(3, 50, 2 * 72)

    def gn_train(x_):
        xg, wg, bg = x_.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
        y = K.group_norm(xg, 32, wg, bg, activation="silu")
        y.backward(torch.ones_like(y))
        return y, xg.grad, wg.grad, bg.grad

    def attn_train():
        qg, kg, vg = (t_.clone().requires_grad_() for t_ in (q, k, v))
        out = K.attention(qg, kg, vg)
        out.backward(torch.ones_like(out))
        return out, qg.grad, kg.grad, vg.grad

    calls = [
        lambda: K.group_norm(x, 32, w, b, activation="silu"),
        lambda: K.group_norm(xs, 32, None, None),
        lambda: gn_train(x),
        lambda: gn_train(_rnd(2, 64, 64, 64, seed=3)),
        lambda: K.attention(q, k, v),
        attn_train,
        lambda: K.timestep_embedding(t, 64, True, 0.0),
        lambda: K.timestep_mlp(t, 64, True, 0.0, 1.0, 10000, w1, b1, w2, b2),
        lambda: K.geglu(h),
    ]
    return dict(zip(LABELS, calls))


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("label", LABELS)
def test_direct_launch_equals_tritons_launch(label):
    call = _ops()[label]
    expected = _as_tuple(_triton_path(call))  # also compiles and caches the variants
    for _ in range(2):  # the first call may still go through Triton (a variant it had not seen); the second not
        got = _as_tuple(call())
    for i, (e, g) in enumerate(zip(expected, got)):
        diff = (e.float() - g.float()).abs().max().item()
        print(f"{label} output {i}: max |direct - triton| = {diff}")
        assert torch.equal(e, g), f"{label}: output {i} differs by up to {diff}"


def test_specialization_changes_after_a_variant_is_cached():
    """A misaligned view, another dtype and another shape, each after the aligned fp16 variant is cached."""
    base = _rnd(2 * 64 * 8 * 8 + 1)
    w, b = _rnd(64, seed=1), _rnd(64, seed=2)
    aligned = base[:-1].view(2, 64, 8, 8)
    misaligned = base[1:].view(2, 64, 8, 8)  # data pointer 2 bytes past a 16-byte boundary
    assert misaligned.data_ptr() % 16 != 0
    for x in (aligned, aligned, misaligned, misaligned.float(), _rnd(3, 64, 5, 7)):
        got = K.group_norm(x, 32, w, b, activation="silu")
        ref = K.group_norm_ref(x, 32, w, b, activation="silu")
        diff = (got.float() - ref.float()).abs().max().item()
        print(tuple(x.shape), x.dtype, x.data_ptr() % 16, "max diff", diff)
        torch.testing.assert_close(got, ref, atol=1e-2 if x.dtype == torch.float16 else 1e-4, rtol=1e-3)


@pytest.mark.parametrize("first, then", [(4, 2), (2, 8)])
def test_a_new_batch_after_a_cached_variant_gets_its_own_grid(first, then):
    """The batch is not an argument of the attention kernels (their grid counts batch x heads), so a variant
    cached at one batch must not lend its grid to another: every row of each result is checked against
    the reference (a reused grid leaves rows unwritten or writes past the output)."""
    for batch in (first, then, first):
        q, k, v = _rnd(batch, 4, 100, 40), _rnd(batch, 4, 77, 40, seed=1), _rnd(batch, 4, 77, 40, seed=2)
        qs = _rnd(batch, 4, 256, 64, seed=3)
        x = _rnd(batch, 64, 16, 16, seed=4)
        pairs = [
            ("cross", K.attention(q, k, v), K.attention_ref(q, k, v)),
            ("self", K.attention(qs, qs, qs), K.attention_ref(qs, qs, qs)),
            ("group_norm", K.group_norm(x, 32, None, None, activation="silu"),
             K.group_norm_ref(x, 32, None, None, activation="silu")),
        ]
        for name, got, ref in pairs:
            worst = (got.float() - ref.float()).flatten(1).abs().amax(1)
            print(f"batch {batch} {name}: max error per item {worst.tolist()}")
            assert torch.isfinite(got).all() and worst.max().item() < 2e-2, (batch, name, worst.tolist())


def test_graph_capture_replays_direct_launches():
    x, w, b = _rnd(2, 320, 64, 64), _rnd(320, seed=1), _rnd(320, seed=2)
    eager = K.group_norm(x, 32, w, b, activation="silu")  # variants cached: the capture launches directly
    static_out = torch.empty_like(eager)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        static_out.copy_(K.group_norm(x, 32, w, b, activation="silu"))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out.copy_(K.group_norm(x, 32, w, b, activation="silu"))
    x.copy_(_rnd(2, 320, 64, 64, seed=5))
    graph.replay()
    torch.cuda.synchronize()
    expected = K.group_norm(x, 32, w, b, activation="silu")
    assert torch.equal(static_out, expected), (static_out.float() - expected.float()).abs().max()


def test_launch_hooks_see_every_launch():
    from triton import knobs

    x, w, b = _rnd(2, 64, 8, 8), _rnd(64, seed=1), _rnd(64, seed=2)
    K.group_norm(x, 32, w, b)  # cached
    seen = []
    hook = lambda metadata: seen.append(metadata)  # noqa: E731
    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):  # Triton 3.5+: a chain of hooks
        chain.add(hook)
    else:
        knobs.runtime.launch_enter_hook = hook
    try:
        for _ in range(3):
            K.group_norm(x, 32, w, b)
    finally:
        if hasattr(chain, "remove"):
            chain.remove(hook)
        else:
            knobs.runtime.launch_enter_hook = chain
    print("hook calls:", len(seen))
    assert len(seen) == 3
