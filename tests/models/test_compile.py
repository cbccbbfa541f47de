"""torch.compile(fullgraph=True) of every model and of the scheduler step.

``fullgraph=True`` raises at the first graph break, so a compile that returns is one graph; a
counting backend also checks that one call is one frame. Every compiled call is compared with the
eager one: fp32 on the CPU, within 1e-5 of the output's largest magnitude (the difference is
printed). The cheap checks use the "eager" backend (Dynamo's graph, and the custom ops' fakes, run by
eager kernels) and "aot_eager" (AOTAutograd's functionalisation too); one tiny model goes through the
default backend, Inductor, which compiles C++ kernels on the CPU (half of this file's time).

Two dispatch paths are traced. The reference path is what runs on the CPU: plain torch ops. The
fused path is what runs on a GPU: the dispatch picks the custom ops ``torch.ops.fusediff.*``, whose
fakes Dynamo traces. On the CPU it is reached with backend "fused" and Triton's kernels stood in for
by :func:`fused_dispatch_on_cpu`: each custom op then runs its real Python wrapper around a launch
that computes the reference into the output the kernel would write (same strides), so the graph,
the fakes and the strides are the GPU's and only the arithmetic is the reference's.
tests/models/test_compile_cuda.py compiles the real kernels on a GPU.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from fusediff import kernels as K
from fusediff.kernels import _backend
from fusediff.models import AutoencoderKL, Transformer2DModel, UNet2DConditionModel, UNet2DModel, VQModel
from support.configs import TINY_AUTOENCODER, TINY_COND_UNET, TINY_UNET
from support.parity import assert_close, one_thread  # noqa: F401  (one_thread: autouse)

RTOL = 1e-5  # max |compiled - eager| / max |eager|, fp32

UNET, COND, AUTOENCODER = TINY_UNET, TINY_COND_UNET, TINY_AUTOENCODER

def _cases():
    """name -> (model class, config, inputs, fn(model, *inputs) -> output tensor); the inputs are seeded."""
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([10, 500])
    ctx = torch.randn(2, 5, 12, generator=g)
    image = torch.randn(2, 3, 8, 8, generator=g)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    return {
        "unet_2d": (UNet2DModel, UNET, (image, t), lambda m, x, t: m(x, t).sample),
        # the learned time table and class labels check their index range: an assertion in the graph
        "unet_2d_learned_classes": (UNet2DModel, dict(UNET, time_embedding_type="learned", num_train_timesteps=1000,
                                                      num_class_embeds=4, resnet_time_scale_shift="scale_shift"),
                                    (image, t, torch.tensor([1, 3])),
                                    lambda m, x, t, c: m(x, t, class_labels=c).sample),
        "unet_2d_condition_odd": (UNet2DConditionModel, COND, (torch.randn(2, 4, 7, 9, generator=g), t, ctx),
                                  lambda m, x, t, c: m(x, t, c).sample),
        "unet_2d_condition_linear_cond": (UNet2DConditionModel, dict(COND, use_linear_projection=True,
                                                                     time_cond_proj_dim=6),
                                          (latents, t, ctx, torch.randn(2, 6, generator=g)),
                                          lambda m, x, t, c, tc: m(x, t, c, timestep_cond=tc).sample),
        "transformer_2d": (Transformer2DModel, dict(num_attention_heads=2, attention_head_dim=4, in_channels=8,
                                                    norm_num_groups=4, cross_attention_dim=12),
                           (torch.randn(2, 8, 4, 4, generator=g), ctx), lambda m, x, c: m(x, c).sample),
        "autoencoder_kl_decode": (AutoencoderKL, AUTOENCODER, (latents,), lambda m, z: m.decode(z).sample),
        "autoencoder_kl": (AutoencoderKL, AUTOENCODER, (image,), lambda m, x: m(x).sample),  # encode, mode, decode
        "vq_model": (VQModel, dict(AUTOENCODER, num_vq_embeddings=16), (image,), lambda m, x: m(x).sample),
        "vq_model_decode_codes": (VQModel, dict(AUTOENCODER, latent_channels=3, num_vq_embeddings=16,
                                                lookup_from_codebook=True), (torch.randint(0, 16, (32,), generator=g),),
                                  lambda m, i: m.decode(i, force_not_quantize=True, shape=(2, 4, 4, 3)).sample),
    }


CASES = list(_cases())


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def build(name: str, layout: torch.memory_format = torch.contiguous_format):
    """(model in eval mode, inputs, fn) of case ``name``; seeded."""
    torch.manual_seed(0)
    cls, config, inputs, fn = _cases()[name]
    model = cls(**config).eval().to(memory_format=layout)
    inputs = tuple(x.contiguous(memory_format=layout) if x.dim() == 4 else x for x in inputs)
    return model, inputs, fn


def compile_and_compare(name: str, backend: str, layout: torch.memory_format = torch.contiguous_format):
    """Compile case ``name`` with fullgraph=True; assert one frame and the eager result. Returns the FX graphs'
    call targets, the output, and (model, fn, compiled) for more calls."""
    model, inputs, fn = build(name, layout)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(lambda *a: fn(model, *a), backend=counter, fullgraph=True)
    with torch.no_grad():
        expected = fn(model, *inputs)
        got = compiled(*inputs)
    assert counter.frame_count == 1, f"{name}: {counter.frame_count} frames"
    assert_close(got, expected, f"{name}, torch.compile(backend={backend!r}) against eager", RTOL)
    targets = {str(node.target) for gm in counter.graphs for node in gm.graph.nodes if node.op == "call_function"}
    return targets, got, (model, fn, compiled)


@pytest.mark.parametrize("name", [name for name in CASES if name != "unet_2d_learned_classes"])
def test_reference_path_compiles_without_graph_breaks(name):
    targets, _, _ = compile_and_compare(name, "eager")
    assert not [t for t in targets if "fusediff" in t], "the reference path runs plain torch ops"


def test_index_checks_become_assertions_in_the_graph():
    """The range checks read values back in eager mode (ValueError); compiled, they assert in the graph."""
    _, _, (model, fn, compiled) = compile_and_compare("unet_2d_learned_classes", "eager")
    image, t, labels = _cases()["unet_2d_learned_classes"][2]
    with torch.no_grad():
        for bad in ((image, torch.tensor([10, 1000]), labels), (image, t, torch.tensor([1, 4]))):
            with pytest.raises(ValueError, match=r"must lie in \[0, "):
                fn(model, *bad)
            with pytest.raises(RuntimeError, match=r"must lie in \[0, "):
                compiled(*bad)


# --- the fused path ----------------------------------------------------------------------------------


def _group_norm_launch(x, num_groups, weight, bias, eps, silu, channels_last, out=None, force_plan=None, add=None):
    y = sys.modules["fusediff.kernels.group_norm"]._ref(x, num_groups, weight, bias, eps, "silu" if silu else None,
                                                        add)
    return (torch.empty_like(x) if out is None else out).copy_(y)


def _attention_launch(q, k, v, scale, out=None, config=None):
    y = sys.modules["fusediff.kernels.attention"]._ref(q, k, v, scale)
    return (q.new_empty(q.shape) if out is None else out).copy_(y)


def _stand_in(op: str) -> types.SimpleNamespace:
    """fusediff.kernels.<op>_triton with ``launch`` computing <op>'s reference; ops whose launch takes the
    reference's arguments (and maybe out=) need no entry in _LAUNCHES."""
    if op in _LAUNCHES:
        return types.SimpleNamespace(launch=_LAUNCHES[op])
    ref = sys.modules[f"fusediff.kernels.{op}"]._ref

    def launch(*args, out=None, **options):
        y = ref(*args)
        return y if out is None else out.copy_(y)

    return types.SimpleNamespace(launch=launch)


_LAUNCHES = {"group_norm": _group_norm_launch, "attention": _attention_launch}


@pytest.fixture
def fused_dispatch_on_cpu(monkeypatch):
    """Backend "fused" on CPU tensors, as under TRITON_INTERPRET=1, with each op's Triton launch computing its
    reference into the output the kernel writes (see the module docstring)."""
    if not _backend._have_triton():
        pytest.skip("the fused dispatch needs Triton importable")
    monkeypatch.setattr(_backend, "_interpreting", lambda: True)
    monkeypatch.setattr(_backend, "triton_module", _stand_in)
    with K.use_backend("fused"):
        yield


@pytest.mark.parametrize("name, backend", [("unet_2d_condition_odd", "eager"), ("autoencoder_kl_decode", "aot_eager")])
def test_fused_path_compiles_to_the_custom_ops(fused_dispatch_on_cpu, name, backend):
    targets, _, _ = compile_and_compare(name, backend)
    ops = {t for t in targets if "fusediff" in t}
    print(name, sorted(ops))
    assert {"fusediff.group_norm", "fusediff.attention"} <= ops, ops
    if name.startswith("unet"):
        assert "fusediff.timestep_mlp" in ops


def test_inductor_channels_last_with_the_fused_dispatch(fused_dispatch_on_cpu):
    """Inductor, on a channels-last model whose GroupNorm and attention are the custom ops: it lays out its
    buffers from the fakes' strides, so a fake that disagreed with its op would give wrong numbers here."""
    with torch._inductor.config.patch(compile_threads=1):  # no pool of compile workers for a few kernels
        targets, out, _ = compile_and_compare("transformer_2d", "inductor", torch.channels_last)
    assert {"fusediff.group_norm", "fusediff.attention"} <= targets
    assert out.is_contiguous(memory_format=torch.channels_last)


# --- the scheduler step --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["ref", "fused"])
def test_scheduler_step_compiles(backend):
    """Every argument form of the fused step in one graph: list or tensor coefficients, noise, history,
    the x0 output and out= (whose overlap check needs data pointers, so it is eager-only)."""
    if backend == "fused" and K._ext.extension() is None:
        pytest.skip("the fused step on the CPU needs the compiled extension fusediff._C")
    g = torch.Generator().manual_seed(2)
    x, m, n, h = (torch.randn(2, 4, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
                  for _ in range(4))
    coeffs = [0.9, -0.4, 0.1, 0.7, 0.2, 0.05, 0.1, 0.03, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]  # 14: v_a, v_b unused

    def step(x, m, n, h, c, out):
        prev, x0 = K.scheduler_step(x, m, c, noise=n, history=[h], return_pred=True)
        return prev, x0, K.scheduler_step(x, m, c, out=out)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    with K.use_backend(backend):
        for c in (coeffs, torch.tensor(coeffs)):
            expected = step(x, m, n, h, c, torch.empty_like(x))
            out = torch.empty_like(x)
            got = compiled(x, m, n, h, c, out)
            assert got[2] is out
            for a, b, what in zip(got, expected, ("prev", "x0", "out=")):
                assert_close(a, b, f"scheduler_step {backend}, {type(c).__name__} coeffs, {what}", RTOL)
    targets = {str(node.target) for gm in counter.graphs for node in gm.graph.nodes}
    assert ("fusediff.scheduler_step" in targets) == (backend == "fused")
