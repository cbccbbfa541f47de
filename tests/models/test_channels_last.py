"""Channels-last end to end: every model gives the same result in either layout,
returns channels-last outputs for channels-last inputs and weights, and makes no layout copy.

Same results: each tiny model runs contiguous (NCHW weights and input), then moved to channels-last
with a channels-last input, then channels-last with a contiguous input; the outputs must agree to
fp32 rounding (convolutions pick other algorithms per layout), and the output of both channels-last
runs must be channels-last; the largest difference is printed.

No copies: :class:`LayoutAudit` is a TorchDispatchMode that sees every aten op of a forward and
records (1) an op that reads a tensor in one layout and writes one of the same shape in another (a
``.contiguous()``, a reshape that cannot be a view, a sum of a channels-last and a contiguous map;
dims the input broadcasts, stride 0, have no layout and are left out of the comparison),
(2) a convolution whose input and weight layouts differ (the GPU convolution converts one of them),
(3) a non-view op that takes a 4-D map in the run's layout and writes one in the other, and (4) a
GroupNorm input the fused kernel cannot read where it lies (it would fall back to the copying
reference).
The audit runs with ``fusediff.kernels.group_norm`` and ``attention`` replaced by stand-ins that
compute the reference result unobserved and return it with the strides the fused kernels give
(GroupNorm: x's; attention: the ``out_layout`` asked for). That is the fused path's layout
behaviour without its kernels: the CPU references copy by design (GroupNorm's reshapes an NHWC map
to (B, G, -1)), which says nothing about the models, and the Triton interpreter cannot be switched
on inside one test process (TRITON_INTERPRET is read when the kernels' module is first imported)
and is slow. tests/models/test_channels_last_cuda.py profiles the real kernels on a GPU.

Nearest 2x: on CUDA, Upsample2D doubles a channels-last map with one broadcast copy in NHWC order
(``upsample_nearest_2x_channels_last``) instead of PyTorch's slow NHWC nearest kernel. The copy must
equal ``F.interpolate`` bit for bit, channels-last, on odd sizes; the models run through it on the CPU
(enabled there by the tests) give the contiguous result without a layout change, and it compiles.
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fusediff.kernels
from fusediff.models import AutoencoderKL, Transformer2DModel, UNet2DConditionModel, UNet2DModel, Upsample2D, VQModel
from fusediff.models import resnet
from fusediff.models.resnet import upsample_nearest_2x_channels_last
from support.configs import TINY_AUTOENCODER, TINY_COND_UNET, TINY_UNET
from support.parity import assert_close, one_thread  # noqa: F401  (one_thread: autouse)

CL = torch.channels_last
RTOL = 1e-5  # max |channels-last - contiguous| / max |contiguous|, fp32

UNET, COND, AUTOENCODER = TINY_UNET, TINY_COND_UNET, TINY_AUTOENCODER

def _cases():
    """name -> (model class, config, inputs, run(model, *inputs) -> output map); the inputs are drawn from the
    global generator, which _build seeds."""
    t = torch.tensor([10, 500])
    ctx = torch.randn(2, 5, 12)
    image = torch.randn(2, 3, 8, 8)
    return {
        # attention blocks with 2 heads, conv resamplers
        "unet_2d": (UNet2DModel, UNET, (image, t), lambda m, x, t: m(x, t).sample),
        # scale-shift conditioning, residual resamplers, padding-0 downsampling, class labels
        "unet_2d_resnet_resample": (
            UNet2DModel, dict(UNET, resnet_time_scale_shift="scale_shift", downsample_type="resnet",
                              upsample_type="resnet", downsample_padding=0, num_class_embeds=4),
            (image, t), lambda m, x, t: m(x, t, class_labels=torch.tensor([1, 3])).sample),
        # SD 1.x-like: conv projections; odd latent sizes (the upsampler is told the skip's size)
        "unet_2d_condition": (UNet2DConditionModel, COND, (torch.randn(2, 4, 7, 9), t, ctx),
                              lambda m, x, t, c: m(x, t, c).sample),
        # SD 2.x-like: linear projections
        "unet_2d_condition_linear": (UNet2DConditionModel, dict(COND, use_linear_projection=True),
                                     (torch.randn(2, 4, 8, 8), t, ctx), lambda m, x, t, c: m(x, t, c).sample),
        "transformer_2d": (Transformer2DModel, dict(num_attention_heads=2, attention_head_dim=4, in_channels=8,
                                                    norm_num_groups=4, cross_attention_dim=12),
                           (torch.randn(2, 8, 4, 4), ctx), lambda m, x, c: m(x, c).sample),
        # the posterior's parameters [mu, log sigma^2]; mode() is a channel slice of them, never dense
        "autoencoder_kl_encode": (AutoencoderKL, AUTOENCODER, (image,),
                                  lambda m, x: m.encode(x).latent_dist.parameters),
        "autoencoder_kl_sample": (AutoencoderKL, AUTOENCODER, (image,),
                                  lambda m, x: m(x, sample_posterior=True, generator=torch.Generator().manual_seed(0))
                                  .sample),
        "autoencoder_kl_decode": (AutoencoderKL, AUTOENCODER, (torch.randn(2, 4, 4, 4),),
                                  lambda m, z: m.decode(z).sample),
        "autoencoder_kl": (AutoencoderKL, AUTOENCODER, (image,), lambda m, x: m(x).sample),
        "vq_model": (VQModel, dict(AUTOENCODER, num_vq_embeddings=16), (image,), lambda m, x: m(x).sample),
    }


CASES = list(_cases())
# cases the audit skips, with the reason
NOT_AUDITED = {"autoencoder_kl_sample": "the posterior's noise is drawn contiguous, as diffusers draws it (same seed, "
                                        "same latents); mu + sigma * eps reads it strided, which the audit flags"}


def _build(name: str, layout: torch.memory_format):
    """(model in ``layout``, its inputs with the 4-D ones in ``layout``, run); seeded, so equal across layouts."""
    torch.manual_seed(0)
    cls, config, args, run = _cases()[name]
    model = cls(**config).eval().to(memory_format=layout)
    args = tuple(a.contiguous(memory_format=layout) if a.dim() == 4 else a for a in args)
    return model, args, run


def is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


@pytest.mark.parametrize("name", CASES)
def test_channels_last_gives_the_contiguous_result(name):
    with torch.no_grad():
        model, args, run = _build(name, torch.contiguous_format)
        expected = run(model, *args)
        assert expected.is_contiguous(), f"{name}: a contiguous model and input give a contiguous output"
        model_cl, args_cl, _ = _build(name, CL)
        for what, inputs in (("channels-last input", args_cl), ("contiguous input", args)):
            got = run(model_cl, *inputs)
            assert_close(got, expected, f"{name}, channels-last model, {what}", RTOL)
            assert is_channels_last(got), f"{name}, {what}: output strides {got.stride()} are not channels-last"


# --- the audit --------------------------------------------------------------------------------------


def _order(t: torch.Tensor, skip: set[int] = frozenset()) -> tuple[int, ...]:
    """t's dims of size > 1 and not in ``skip``, outermost in memory first: its layout, ignoring dims that
    have none."""
    dims = [d for d in range(t.dim()) if t.shape[d] > 1 and d not in skip]
    return tuple(sorted(dims, key=lambda d: -t.stride(d)))


def _broadcast_dims(t: torch.Tensor) -> set[int]:
    """The dims t broadcasts (stride 0, as after .expand): they have no layout of their own."""
    return {d for d in range(t.dim()) if t.stride(d) == 0}


def _dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill its span of memory without gaps or overlaps (some permutation of contiguous)."""
    expected = 1
    for d in sorted((d for d in range(t.dim()) if t.shape[d] > 1), key=lambda d: t.stride(d)):
        if t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


def _is_map(t: torch.Tensor) -> bool:
    """A 4-D tensor whose layout is not ambiguous (contiguous or channels-last, not both)."""
    return t.dim() == 4 and t.is_contiguous() != t.is_contiguous(memory_format=CL)


# products read their operands transposed as they like (a weight as W^T); (1) looks at the other ops
PRODUCTS = {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.convolution"}


class LayoutAudit(TorchDispatchMode):
    """Records the layout changes of the aten ops run under it (see the module docstring), in ``events``."""

    def __init__(self, layout: torch.memory_format) -> None:
        super().__init__()
        self.layout, self.events, self.paused = layout, [], False

    @contextlib.contextmanager
    def pause(self):
        self.paused, was = True, self.paused
        try:
            yield
        finally:
            self.paused = was

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        name = str(func.overloadpacket)
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        storages = {t.untyped_storage().data_ptr() for t in ins}
        for o in outs:
            if o.untyped_storage().data_ptr() in storages and name != "aten.copy_":
                continue  # a view (or in place): moves no data
            for i in ins if name not in PRODUCTS else ():
                skip = _broadcast_dims(i)
                if i.shape == o.shape and i.numel() > 1 and _dense(o) and _order(i, skip) != _order(o, skip):
                    self.events.append(f"{name}: reads {tuple(i.shape)} strides {i.stride()}, writes strides "
                                       f"{o.stride()}")
                    break
            if _is_map(o) and not o.is_contiguous(memory_format=self.layout) and any(
                    _is_map(i) and i.is_contiguous(memory_format=self.layout) for i in ins):
                self.events.append(f"{name}: writes a {tuple(o.shape)} map with strides {o.stride()}")
        if name == "aten.convolution" and _is_map(args[0]) and _is_map(args[1]) \
                and _order(args[0]) != _order(args[1]):
            self.events.append(f"aten.convolution: input strides {args[0].stride()}, weight strides "
                               f"{args[1].stride()}")
        return out


@contextlib.contextmanager
def fused_layout_stand_ins(monkeypatch, audit: LayoutAudit):
    """fusediff.kernels.group_norm/attention as the fused kernels lay out their outputs, computed unobserved."""
    group_norm, attention = fusediff.kernels.group_norm, fusediff.kernels.attention

    def group_norm_stand_in(x, *args, **kwargs):
        if not (x.is_contiguous() or x.is_contiguous(memory_format=CL)):
            audit.events.append(f"group_norm: input strides {x.stride()} (the fused kernel reads NCHW or NHWC)")
        with audit.pause(), fusediff.kernels.use_backend("ref"):
            return torch.empty_like(x).copy_(group_norm(x, *args, **kwargs))  # the kernel writes into empty_like(x)

    def attention_stand_in(q, k, v, scale=None, **kwargs):
        with audit.pause(), fusediff.kernels.use_backend("ref"):
            return attention(q, k, v, scale, **kwargs)  # the reference lays out its output as the kernel does

    with monkeypatch.context() as patch:
        patch.setattr(fusediff.kernels, "group_norm", group_norm_stand_in)
        patch.setattr(fusediff.kernels, "attention", attention_stand_in)
        with audit:
            yield audit


def audited(monkeypatch, layout, fn, *args):
    """(fn(*args), the audit's events) with the fused kernels' layouts stood in."""
    audit = LayoutAudit(layout)
    with torch.no_grad(), fused_layout_stand_ins(monkeypatch, audit):
        out = fn(*args)
    return out, audit.events


@pytest.mark.parametrize("name", [name for name in CASES if name not in NOT_AUDITED])
def test_no_layout_copies_in_channels_last(monkeypatch, name):
    model, args, run = _build(name, CL)
    out, events = audited(monkeypatch, CL, run, model, *args)
    assert is_channels_last(out)
    assert not events, f"{name}: {len(events)} layout changes in a channels-last forward:\n" + "\n".join(events)


@pytest.mark.parametrize("name", ["unet_2d", "unet_2d_condition", "autoencoder_kl"])
def test_contiguous_models_stay_contiguous(monkeypatch, name):
    """A contiguous run never produces a channels-last map (a flip would cost a conversion at the next conv);
    its (B, C, H, W) <-> (B, H*W, C) transposes around attention are inherent to NCHW and not checked."""
    model, args, run = _build(name, torch.contiguous_format)
    out, events = audited(monkeypatch, torch.contiguous_format, run, model, *args)
    flips = [e for e in events if "writes a" in e or "convolution" in e]
    assert out.is_contiguous() and not flips, "\n".join(flips)


def test_the_audit_sees_layout_copies(monkeypatch):
    """The audit is not blind: each kind of layout change it looks for, done on purpose, is recorded."""
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=CL)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)  # contiguous weight
    mistakes = {
        "contiguous()": lambda: x.contiguous(),
        "a reshape that copies": lambda: x.flatten(1),
        "a sum of both layouts": lambda: x + x.contiguous(),
        "weights in the other layout": lambda: conv(x),
        "group_norm on other strides": lambda: fusediff.kernels.group_norm(x.transpose(2, 3), 4),
        "a broadcast written in the other layout": lambda: x[:, :, None].expand(2, 8, 3, 4, 4).contiguous(),
    }
    for what, fn in mistakes.items():
        _, events = audited(monkeypatch, CL, fn)
        print(what, events)
        assert events, f"the audit missed {what}"
    _, events = audited(monkeypatch, CL, lambda: torch.nn.functional.silu(x) + x)
    assert not events, events
    # a broadcast copied in its own memory order (the channels-last nearest 2x) is no layout change
    _, events = audited(monkeypatch, CL, lambda: upsample_nearest_2x_channels_last(x))
    assert not events, events
    nchw = x.contiguous()
    # in a contiguous run, a sum whose first operand is channels-last writes channels-last
    _, events = audited(monkeypatch, torch.contiguous_format, lambda: x + nchw)
    assert any("writes a" in e for e in events), events


def test_attention_out_layout(monkeypatch):
    """out_layout="bshd" gives the same values laid out (B, Sq, H, D), so merging the heads is a view; the
    reference's query chunks write into that layout too. (The kernel's is checked on a GPU.)"""
    attention_module = sys.modules["fusediff.kernels.attention"]
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 9, 3, 8, generator=g).transpose(1, 2) for _ in range(3))  # (B, S, H, D) views
    for rows in (None, 2):  # one pass, then chunks of 2 query rows
        if rows:
            monkeypatch.setattr(attention_module, "REF_SCORE_BYTES", rows * 2 * 3 * 9 * 4)
        bhsd = fusediff.kernels.attention(q, k, v)
        bshd = fusediff.kernels.attention(q, k, v, out_layout="bshd")
        assert bhsd.is_contiguous() and bshd.transpose(1, 2).is_contiguous()
        assert torch.equal(bshd, bhsd)
        assert bshd.transpose(1, 2).reshape(2, 9, 24).data_ptr() == bshd.data_ptr()
    with pytest.raises(ValueError, match="out_layout must be one of bhsd, bshd"):
        fusediff.kernels.attention(q, k, v, out_layout="nhwc")


# --- nearest 2x upsampling of a channels-last map as one copy ----------------------------------------

NEAREST_SHAPES = [  # (B, C, H, W)
    (1, 2, 1, 1),  # one pixel
    (2, 3, 5, 7),  # odd sizes
    (3, 17, 9, 4),  # odd batch and channel counts
    (1, 64, 16, 16),  # aligned
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", NEAREST_SHAPES, ids=str)
def test_nearest_2x_copy_is_interpolate_exactly(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 100).to(dtype).contiguous(memory_format=CL)
    expected = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
    got = upsample_nearest_2x_channels_last(x)
    assert got.shape == expected.shape and got.dtype == dtype
    assert torch.equal(got, expected), f"{shape} {dtype}: {int((got != expected).sum())} elements differ"
    assert got.is_contiguous(memory_format=CL), f"{shape}: output strides {got.stride()} are not channels-last"
    assert got.permute(0, 2, 3, 1).is_contiguous(), "the copy is dense in NHWC order"


def test_nearest_2x_copy_gradient():
    x = torch.randn(2, 5, 3, 7, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    grad = torch.randn(2, 5, 6, 14, dtype=torch.float64)
    (theirs,) = torch.autograd.grad(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"), x, grad)
    (ours,) = torch.autograd.grad(upsample_nearest_2x_channels_last(x), x, grad)
    torch.testing.assert_close(ours, theirs)


def _nearest_2x_copy_on_cpu(patch) -> list:
    """Make Upsample2D take the copy on CPU tensors too (it does on CUDA ones); returns the list its calls go to."""
    calls = []

    def counted(x):
        calls.append(tuple(x.shape))
        return upsample_nearest_2x_channels_last(x)

    patch.setattr(resnet, "NEAREST_2X_COPY_DEVICES", ("cuda", "cpu"))
    patch.setattr(resnet, "upsample_nearest_2x_channels_last", counted)
    return calls


@pytest.fixture
def nearest_2x_copy_on_cpu(monkeypatch):
    return _nearest_2x_copy_on_cpu(monkeypatch)


def test_upsample2d_routes_exact_2x_channels_last_to_the_copy(monkeypatch):
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=CL)
    cases = {  # what -> (input, output_size, whether the copy runs where it is enabled)
        "2x": (x, None, True),
        "output_size 2x": (x, (10, 14), True),
        "output_size torch.Size 2x": (x, torch.Size([10, 14]), True),
        "output_size not 2x": (x, (11, 14), False),
        "contiguous input": (x.contiguous(), None, False),
        "strided channels-last slice": (x[:, :, :, :4], None, False),
    }
    for enabled in (False, True):  # the CPU default, then as on a GPU
        with monkeypatch.context() as patch:
            calls = _nearest_2x_copy_on_cpu(patch) if enabled else []
            for what, (inp, size, copies) in cases.items():
                calls.clear()
                got = Upsample2D(6)(inp, size)
                if size is None:
                    expected = torch.nn.functional.interpolate(inp, scale_factor=2.0, mode="nearest")
                else:
                    expected = torch.nn.functional.interpolate(inp, size=size, mode="nearest")
                assert torch.equal(got, expected), what
                assert got.stride() == expected.stride(), (what, got.stride(), expected.stride())
                assert bool(calls) == (copies and enabled), f"{what}: copy taken {bool(calls)}, enabled {enabled}"


@pytest.mark.parametrize("name", ["autoencoder_kl_decode", "autoencoder_kl", "vq_model", "unet_2d"])
def test_nearest_2x_copy_in_channels_last_models(nearest_2x_copy_on_cpu, monkeypatch, name):
    """The models with the copy in their upsamplers (as on a GPU): the contiguous result, no layout change."""
    with torch.no_grad():
        model, args, run = _build(name, torch.contiguous_format)
        expected = run(model, *args)
        model_cl, args_cl, _ = _build(name, CL)
        assert_close(run(model_cl, *args_cl), expected, f"{name}, channels-last with the nearest 2x copy", RTOL)
    assert nearest_2x_copy_on_cpu, f"{name}: no upsampler took the copy"
    nearest_2x_copy_on_cpu.clear()
    out, events = audited(monkeypatch, CL, run, model_cl, *args_cl)
    assert nearest_2x_copy_on_cpu and is_channels_last(out)
    assert not events, f"{name}: {len(events)} layout changes:\n" + "\n".join(events)


def test_nearest_2x_copy_compiles_fullgraph(nearest_2x_copy_on_cpu):
    up = Upsample2D(6, use_conv=True).eval().to(memory_format=CL)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=CL)
    torch.compiler.reset()
    try:
        compiled = torch.compile(up, backend="eager", fullgraph=True)
        with torch.no_grad():
            got, expected = compiled(x), up(x)
    finally:
        torch.compiler.reset()
    assert len(nearest_2x_copy_on_cpu) == 2, "the compiled call and the eager one both take the copy"
    assert torch.equal(got, expected) and is_channels_last(got)
