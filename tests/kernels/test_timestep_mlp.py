"""timestep_mlp: its reference is diffusers' Timesteps + cast + TimestepEmbedding value for value;
the Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1), both plans, on labelled odd
sizes, every weight dtype, with and without biases, strided timesteps and weights, against a
float64 pipeline under the house tolerance rule, outputs poisoned with NaN; the dispatch and
its fallbacks; the custom op and torch.compile; the UNet's time embedding on the fused path;
and bad input, which must raise the same clear exception on every backend.

In the interpreter bfloat16 runs the broadcast product instead of tl.dot (the interpreter's
tl.dot misreads bfloat16) and its float32 -> bfloat16 casts truncate (on CUDA they round to
nearest); the tolerance rule's bfloat16 atol still binds."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from diffusers.models import embeddings as d_emb
from support.spy import record_calls
from support.tolerance import assert_within_ref_error

from fusediff import UNet2DModel
from fusediff import kernels as K

TM = sys.modules["fusediff.kernels.timestep_mlp"]
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or TM._interpreting()) or not TM._have_triton(),
    reason="the Triton kernels run on CUDA, or on CPU tensors under TRITON_INTERPRET=1")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SD = (True, 0.0, 1.0, 10000)  # (flip_sin_to_cos, downscale_freq_shift, scale, max_period) of Stable Diffusion
DDPM = (False, 1.0, 1.0, 10000)
SHAPES = [  # (N, dim, hidden, out_features)
    (1, 1, 3, 2),  # no frequencies: h = silu(b1)
    (2, 5, 17, 9),  # odd everything
    (3, 32, 64, 64),  # small, aligned
    (17, 33, 40, 24),  # more rows than one tl.dot block, odd dim
    (2, 128, 512, 512),  # DDPM CIFAR-10 at batch 2
    (16, 320, 64, 80),  # SD's embedding width, a narrow MLP
]


def weights(dim, hidden, out_features, dtype, seed, bias=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(hidden, dim, generator=g) / math.sqrt(max(dim, 1))
    w2 = torch.randn(out_features, hidden, generator=g) / math.sqrt(hidden)
    b1, b2 = torch.randn(hidden, generator=g), torch.randn(out_features, generator=g)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(w1), cast(b1) if bias else None, cast(w2), cast(b2) if bias else None


def timesteps(n, dtype=torch.int64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.rand(n, generator=g, dtype=torch.float64) * 999).to(device=device, dtype=dtype)
    return torch.randint(0, 1000, (n,), generator=g).to(device=device, dtype=dtype)


def mlp_fp64(t, dim, flip, shift, scale, max_period, w1, b1, w2, b2):
    """The definition in float64: the sinusoid rounded to the weights' dtype (as the UNet casts it), then
    Linear, SiLU, Linear without rounding."""
    half = dim // 2
    j = torch.arange(half, dtype=torch.float64)
    omega = torch.exp(-math.log(max_period) * j / (half - shift)) if half else j
    a = scale * (t.cpu().double()[:, None] * omega[None, :])
    parts = [a.cos(), a.sin()] if flip else [a.sin(), a.cos()]
    emb = torch.cat(parts + [torch.zeros(t.shape[0], dim % 2, dtype=torch.float64)], dim=-1)
    up = lambda p: None if p is None else p.cpu().double()  # noqa: E731
    h = F.silu(F.linear(emb.to(w1.dtype).double(), up(w1), up(b1)))
    return F.linear(h, up(w2), up(b2))


def check(got, args, what):
    n, out_features = args[0].shape[0], args[8].shape[0]
    assert got.shape == (n, out_features) and got.dtype == args[8].dtype, (got.shape, got.dtype)
    assert_within_ref_error(got, TM._ref(*args), mlp_fp64(*args), what)


# --- the reference ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", [SD, DDPM], ids=["sd", "ddpm"])
def test_ref_is_diffusers_modules_with_the_unet_cast(options, dtype):
    flip, shift, _, _ = options
    torch.manual_seed(0)
    proj, mlp = d_emb.Timesteps(33, flip, shift), d_emb.TimestepEmbedding(33, 48).to(dtype)
    t = timesteps(5)
    with torch.no_grad():
        expect = mlp(proj(t).to(dtype))
        got = K.timestep_mlp_ref(t, 33, *options, mlp.linear_1.weight, mlp.linear_1.bias, mlp.linear_2.weight,
                                 mlp.linear_2.bias)
    torch.testing.assert_close(got, expect, rtol=0, atol=0)


def test_public_function_on_the_reference_backend_is_the_reference():
    w1, b1, w2, b2 = weights(9, 12, 7, torch.float32, seed=1)
    t = timesteps(4)
    with K.use_backend("ref"):
        got = K.timestep_mlp(t, 9, *DDPM, w1, b1, w2, b2)
        assert not K.timestep_mlp_runs_fused(t, w1, b1, w2, b2)
    torch.testing.assert_close(got, K.timestep_mlp_ref(t, 9, *DDPM, w1, b1, w2, b2), rtol=0, atol=0)


def test_gradients_flow_through_the_reference():
    w = tuple(p.requires_grad_() for p in weights(8, 6, 5, torch.float64, seed=2))
    t = timesteps(3)
    assert torch.autograd.gradcheck(lambda *w: K.timestep_mlp(t, 8, *SD, *w), w)


# --- the Triton kernels ----------------------------------------------------------------------

def launch(args, plan, out=None):
    return TM._kernels().launch(*args, plan=plan, out=out)


@needs_triton
@pytest.mark.parametrize("plan", ["one", "two"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_triton_plans_write_every_element(shape, dtype, plan):
    n, dim, hidden, out_features = shape
    for bias in (True, False):
        for options in (SD, DDPM):
            if dim // 2 >= 1 and dim // 2 == options[1]:
                continue  # refused by validation
            args = (timesteps(n, seed=n + dim, device=TRITON_DEVICE), dim, *options,
                    *weights(dim, hidden, out_features, dtype, seed=hidden, bias=bias, device=TRITON_DEVICE))
            out = torch.full((n, out_features), float("nan"), dtype=dtype, device=TRITON_DEVICE)
            got = launch(args, plan, out=out)
            assert got is out
            check(got, args, f"{shape} {dtype} plan={plan} bias={bias} options={options}")


@needs_triton
@pytest.mark.parametrize("plan", ["one", "two"])
def test_triton_sd_size(plan):
    # Stable Diffusion's time MLP, 320 -> 1280 -> 1280, at batch 2
    args = (timesteps(2, device=TRITON_DEVICE), 320, *SD, *weights(320, 1280, 1280, torch.float16, seed=3,
                                                                      device=TRITON_DEVICE))
    check(launch(args, plan), args, f"SD 320 -> 1280 -> 1280 fp16 plan={plan}")


@needs_triton
@pytest.mark.parametrize("plan", ["one", "two"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_many_timesteps(dtype, plan):
    # 1000 rows: a grid over row blocks (16 or 64 rows), tl.dot for every dtype on CUDA
    args = (timesteps(1000, torch.float32, seed=4, device=TRITON_DEVICE), 7, *DDPM,
            *weights(7, 24, 20, dtype, seed=4, device=TRITON_DEVICE))
    check(launch(args, plan), args, f"N=1000 {dtype} plan={plan}")


@needs_triton
@pytest.mark.parametrize("tdtype", [torch.int32, torch.int64, torch.float16, torch.float32], ids=str)
def test_triton_timestep_dtypes_and_strides(tdtype):
    w = weights(12, 20, 16, torch.float16, seed=5, device=TRITON_DEVICE)
    base = timesteps(30, tdtype, seed=5, device=TRITON_DEVICE)
    for t, layout in ((base[:6], "contiguous"), (base[::5], "every fifth"), (base[3:4].expand(4), "expanded")):
        args = (t, 12, *SD, *w)
        got = launch(args, "auto")
        check(got, args, f"{tdtype} timesteps, {layout}")
        torch.testing.assert_close(got, launch((t.contiguous(), *args[1:]), "auto"), rtol=0, atol=0)


@needs_triton
def test_triton_strided_weights():
    # a module's weights transposed in memory: (out, in) views of (in, out) storage, and a strided bias
    w1, b1, w2, b2 = weights(10, 24, 18, torch.float32, seed=6, device=TRITON_DEVICE)
    w1t, w2t = w1.t().contiguous().t(), w2.t().contiguous().t()
    b1s = torch.stack([b1, b1], dim=1)[:, 0]
    assert not (w1t.is_contiguous() or w2t.is_contiguous() or b1s.is_contiguous())
    t = timesteps(3, device=TRITON_DEVICE)
    for plan in ("one", "two"):
        args = (t, 10, *DDPM, w1t, b1s, w2t, b2)
        got = launch(args, plan)
        check(got, args, f"strided weights plan={plan}")
        torch.testing.assert_close(got, launch((t, 10, *DDPM, w1, b1, w2, b2), plan), rtol=0, atol=0)


@needs_triton
def test_plans_agree_and_auto_chooses():
    choose = TM._kernels().choose_plan
    w_small, w_wide = torch.empty(64, 128), torch.empty(64, 1100)
    assert choose(2, 128, w_small) == "one" and choose(16, 128, w_small) == "one"
    assert choose(17, 128, w_small) == "two"  # more rows than one launch recomputes cheaply
    assert choose(2, 1100, w_wide) == "two"  # 550 frequencies do not fit in registers
    assert choose(2, 320, torch.empty(1280, 320, dtype=torch.float32)) == "two"  # 1.6 MB of W1 per program
    args = (timesteps(5, device=TRITON_DEVICE), 40, *SD, *weights(40, 48, 24, torch.float16, seed=7,
                                                                     device=TRITON_DEVICE))
    one, two = launch(args, "one"), launch(args, "two")
    torch.testing.assert_close(one, two, rtol=4e-3, atol=4e-3)  # summation order only: an fp16 ulp or two
    with pytest.raises(ValueError, match="plan"):
        launch((args[0], 1100, *SD, *weights(1100, 8, 8, torch.float16, seed=7, device=TRITON_DEVICE)), "one")


@needs_triton
def test_public_function_runs_the_kernels_and_falls_back(monkeypatch):
    w = weights(16, 32, 24, torch.float16, seed=8, device=TRITON_DEVICE)
    t = timesteps(3, device=TRITON_DEVICE)
    calls = record_calls(monkeypatch, TM._kernels(), "launch")
    with K.use_backend("fused"):
        assert K.timestep_mlp_runs_fused(t, *w)
        check(K.timestep_mlp(t, 16, *SD, *w), (t, 16, *SD, *w), "public function")
        K.timestep_mlp(t[:0], 16, *SD, *w)  # no timesteps: the reference
        K.timestep_mlp(t, 16, *SD, *(p.double() for p in w))  # float64 weights: the reference
        K.timestep_mlp(t, 16, *SD, w[0].requires_grad_(), *w[1:])  # autograd: the reference
        with torch.autocast(TRITON_DEVICE, dtype=torch.bfloat16):  # autocast: the reference
            assert K.timestep_mlp(t, 16, *SD, *(p.float() for p in w)).dtype == torch.bfloat16
    w[0].requires_grad_(False)
    with K.use_backend("ref"):
        K.timestep_mlp(t, 16, *SD, *w)
    assert [a[1] for a in calls] == [16], calls
    assert K.timestep_mlp(t[:0], 16, *SD, *w).shape == (0, 24)
    torch.library.opcheck(torch.ops.fusediff.timestep_mlp, (t, 16, True, 0.0, 1.0, 10000.0, *w))
    torch.library.opcheck(torch.ops.fusediff.timestep_mlp, (t, 16, False, 1.0, 2.0, 100.0, w[0], None, w[2], None))


@needs_triton
def test_triton_under_compile_fullgraph(monkeypatch):
    w = weights(16, 32, 24, torch.float32, seed=9, device=TRITON_DEVICE)
    t = timesteps(3, device=TRITON_DEVICE)
    calls = record_calls(monkeypatch, TM._kernels(), "launch")
    with K.use_backend("fused"):
        compiled = torch.compile(lambda t: K.timestep_mlp(t, 16, *SD, *w), backend="aot_eager", fullgraph=True)
        got = compiled(t)
        eager = K.timestep_mlp(t, 16, *SD, *w)
    assert len(calls) >= 2, "the compiled graph did not reach the kernels"
    torch.testing.assert_close(got, eager, rtol=0, atol=0)


@needs_triton
def test_unet_time_embedding_runs_the_fused_op(monkeypatch):
    torch.manual_seed(0)
    unet = UNet2DModel(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=None,
                       class_embed_type="timestep").to(TRITON_DEVICE)
    t = timesteps(2, device=TRITON_DEVICE)
    calls = record_calls(monkeypatch, K, "timestep_mlp")
    with torch.no_grad():
        with K.use_backend("ref"):  # the module path, as before the fused op
            emb_ref = unet._time_embedding(t)
            cls_ref = unet._class_embedding(t + 1, 2, t.device)
            expect = unet.time_embedding(unet.time_proj(t).to(unet.dtype))
        torch.testing.assert_close(emb_ref, expect, rtol=0, atol=0)
        assert calls == []
        with K.use_backend("fused"):
            emb = unet._time_embedding(t)
            cls = unet._class_embedding(t + 1, 2, t.device)
    assert len(calls) == 2, "the time and the class embedding each call timestep_mlp once"
    for got, ref, labels, mlp, what in ((emb, emb_ref, t, unet.time_embedding, "time"),
                                        (cls, cls_ref, t + 1, unet.class_embedding, "class")):
        hi = mlp_fp64(labels, 16, True, 0, 1, 10000, mlp.linear_1.weight, mlp.linear_1.bias, mlp.linear_2.weight,
                      mlp.linear_2.bias)
        assert_within_ref_error(got, ref, hi, f"UNet {what} embedding")


# --- bad input -------------------------------------------------------------------------------

def bad_inputs():
    t = torch.arange(4)
    w1, b1, w2, b2 = weights(8, 6, 5, torch.float32, seed=0)
    ok = dict(timesteps=t, dim=8, flip_sin_to_cos=True, downscale_freq_shift=0.0, scale=1.0, max_period=10000,
              w1=w1, b1=b1, w2=w2, b2=b2)
    return [
        ("timesteps 2-D", dict(ok, timesteps=t.view(2, 2)), ValueError, "timestep_mlp: timesteps must be 1-D"),
        ("dim not w1's", dict(ok, dim=9), ValueError, r"w1 must have shape \(hidden, dim=9\)"),
        ("half == shift", dict(ok, dim=2, downscale_freq_shift=1.0, w1=w1[:, :2]), ValueError,
         "timestep_mlp: dim // 2 - downscale_freq_shift"),
        ("w1 not a tensor", dict(ok, w1=w1.tolist()), TypeError, "w1 must be a torch.Tensor"),
        ("w1 1-D", dict(ok, w1=w1[0]), ValueError, "w1 must be 2-D"),
        ("w1 integer", dict(ok, w1=w1.long()), TypeError, "w1 must be float32"),
        ("w2 inner size", dict(ok, w2=w2[:, :5]), ValueError, r"w2 must have shape \(out_features, hidden=6\)"),
        ("b1 shape", dict(ok, b1=b1[:5]), ValueError, r"b1 must have shape \(6,\)"),
        ("b2 shape", dict(ok, b2=b1), ValueError, r"b2 must have shape \(5,\)"),
        ("b2 a list", dict(ok, b2=b2.tolist()), TypeError, "b2 must be a torch.Tensor or None"),
        ("w2 dtype", dict(ok, w2=w2.half()), ValueError, "w2 is torch.float16, w1 is torch.float32"),
        ("b1 dtype", dict(ok, b1=b1.double()), ValueError, "b1 is torch.float64"),
        ("w2 device", dict(ok, w2=w2.to("meta")), ValueError, "w2 is on meta"),
        ("scale nan", dict(ok, scale=float("nan")), ValueError, "timestep_mlp: scale must be finite"),
    ]


@pytest.mark.parametrize("fn", [K.timestep_mlp, K.timestep_mlp_ref], ids=["timestep_mlp", "timestep_mlp_ref"])
@pytest.mark.parametrize("backend", ["ref", "fused", "auto"])
@pytest.mark.parametrize("case, kwargs, exc, match", bad_inputs(), ids=[b[0] for b in bad_inputs()])
def test_bad_input_raises_on_every_backend(fn, backend, case, kwargs, exc, match):
    with K.use_backend(backend), pytest.raises(exc, match=match):
        fn(**kwargs)
