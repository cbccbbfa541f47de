"""group_norm's fused backward on a CUDA device: dx, dweight and dbias at the feature-map sizes of
diffusion UNets, every dtype, both layouts and both plans, against autograd through group_norm_ref
(float64 and the input's precision) under the house tolerance rule; dx poisoned with NaN (every
element must be written); torch.compile training steps; and a UNet2DModel training step whose
gradients on the fused path match those of the reference path (FUSEDIFF_KERNELS=ref). Every test
here is marked gpu and skips without CUDA."""

from __future__ import annotations

import sys

import pytest
import torch
from support.tolerance import assert_within_ref_error

from fusediff import UNet2DModel
from fusediff import kernels as K

GN = sys.modules["fusediff.kernels.group_norm"]
pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [  # (shape, num_groups)
    ((128, 128, 32, 32), 32),  # a UNet training batch at 32x32: groups of 4 x 1024 (one pass)
    ((16, 320, 64, 64), 32),  # SD UNet, first level: groups of 10 x 4096 (split)
    ((16, 1280, 16, 16), 32),  # SD UNet, deepest level
    ((3, 63, 33, 17), 7),  # non-aligned everything
]
MEMORY_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def inputs(shape, dtype, seed, channels_last=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(shape, generator=g, device="cuda") * 2 + 0.3).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=MEMORY_FORMATS[len(shape)])
    w = (1 + 0.5 * torch.randn(shape[1], generator=g, device="cuda")).to(dtype)
    b = (0.5 * torch.randn(shape[1], generator=g, device="cuda")).to(dtype)
    dy = torch.randn(shape, generator=g, device="cuda").to(dtype)
    return x, w, b, dy


def ref_grads(x, num_groups, w, b, dy, activation):
    """(dx, dw, db) by autograd through group_norm_ref."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    K.group_norm_ref(leaves[0], num_groups, leaves[1], leaves[2], 1e-5, activation).backward(dy)
    return [t.grad for t in leaves]


def check(x, num_groups, w, b, dy, activation, what, plan=None):
    """launch_backward (plan forced or not) against the reference, dx poisoned with NaN first."""
    cl = bool(GN._channels_last(x))
    _, mean, rstd = GN._kernels().launch(x, num_groups, w, b, 1e-5, activation == "silu", cl, return_stats=True)
    out = torch.full_like(x, float("nan"))  # poisoned: a missed element stays NaN and fails the rule
    got = GN._backward_kernels().launch_backward(dy, x, mean, rstd, w, b, num_groups, activation == "silu", cl,
                                                 force_plan=plan, out=out)
    assert got[0] is out and out.stride() == x.stride()
    lowp = ref_grads(x, num_groups, w, b, dy, activation)
    hi = ref_grads(x.double(), num_groups, w.double(), b.double(), dy.double(), activation)
    for name, g, lo, h in zip(("dx", "dweight", "dbias"), got, lowp, hi):
        assert_within_ref_error(g.to(lo.dtype), lo, h, f"{what}: {name}")


@pytest.mark.parametrize("plan", [None, "split"], ids=["auto plan", "split plan"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, num_groups", SHAPES, ids=[str(s) for s, _ in SHAPES])
def test_unet_shapes(shape, num_groups, dtype, channels_last, plan):
    if plan == "split" and GN._backward_kernels().plan(torch.empty(shape, device="meta"), num_groups) == "split":
        pytest.skip("the auto plan is already split for this shape")
    x, w, b, dy = inputs(shape, dtype, seed=sum(shape), channels_last=channels_last)
    check(x, num_groups, w, b, dy, "silu", f"{shape} G={num_groups} {dtype} channels_last={channels_last} {plan}",
          plan)


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("shape, num_groups", [((4, 64, 6, 10, 12), 8), ((8, 96, 33), 32), ((6, 512), 32)],
                         ids=["5-D", "1-D spatial", "no spatial dims"])
def test_other_ranks_through_autograd(shape, num_groups, activation):
    x, w, b, dy = inputs(shape, torch.bfloat16, seed=3, channels_last=len(shape) == 5)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    with K.use_backend("fused"):
        y = K.group_norm(leaves[0], num_groups, leaves[1], leaves[2], 1e-5, activation)
    y.backward(dy[..., :].transpose(-1, -2).contiguous().transpose(-1, -2))  # dy of other strides
    lowp = ref_grads(x, num_groups, w, b, dy, activation)
    hi = ref_grads(x.double(), num_groups, w.double(), b.double(), dy.double(), activation)
    for name, t, lo, h in zip(("dx", "dweight", "dbias"), leaves, lowp, hi):
        assert_within_ref_error(t.grad, lo, h, f"{shape} {activation}: {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_compiled_training_step(dtype):
    x, w, b, dy = inputs((8, 128, 32, 32), dtype, seed=4, channels_last=True)

    def step(x, w, b):
        return K.group_norm(x, 32, w, b, activation="silu")

    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    torch.compile(step, fullgraph=True)(*leaves).backward(dy)
    lowp = ref_grads(x, 32, w, b, dy, "silu")
    hi = ref_grads(x.double(), 32, w.double(), b.double(), dy.double(), "silu")
    for name, t, lo, h in zip(("dx", "dweight", "dbias"), leaves, lowp, hi):
        assert_within_ref_error(t.grad, lo, h, f"torch.compile {dtype}: {name}")


def unet_grads(unet, x, t, backend):
    """Every parameter's gradient of a loss on the UNet's output, computed with ``backend``; copies."""
    with K.use_backend(backend):
        loss = unet(x, t).sample.float().square().mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in unet.named_parameters() if p.grad is not None}
    unet.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unet_training_step_fused_agrees_with_reference(dtype, monkeypatch):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(64, 128), norm_num_groups=32,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).to("cuda")
    x = torch.randn(4, 3, 32, 32, device="cuda")
    t = torch.tensor([10, 200, 500, 900], device="cuda")
    hi = unet_grads(unet.double(), x.double(), t, "ref")
    low = unet.to(dtype)
    ref = unet_grads(low, x.to(dtype), t, "ref")
    calls = []
    real = GN._backward_kernels().launch_backward
    monkeypatch.setattr(GN._backward_kernels(), "launch_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = unet_grads(low, x.to(dtype), t, "auto")
    assert calls, "the UNet's training step did not run the fused GroupNorm backward"
    assert fused.keys() == ref.keys() == hi.keys()
    # The attention key biases have a true gradient of 0 (softmax ignores a shift shared by all keys): their
    # low-precision gradients are rounding noise, which no rule relative to the gradient can bound.
    noise = [n for n in hi if (ref[n] - hi[n]).abs().max() > 0.5 * hi[n].abs().max()]
    assert all(n.endswith("to_k.bias") for n in noise), f"gradients lost in the reference's own error: {noise}"
    for name in (n for n in hi if n not in noise):
        # whole-model gradients: bound each parameter's error relative to its gradient's scale
        scale = hi[name].abs().max().item() + 1e-12
        assert_within_ref_error(fused[name] / scale, ref[name] / scale, hi[name] / scale, f"UNet {dtype} {name}")
