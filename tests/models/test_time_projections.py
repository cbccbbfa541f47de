"""Every ResNet block's time projection in one matmul (fusediff.models.time_projections): against the blocks'
own projections, the stacked weight kept while the weights are unchanged and rebuilt when they change, and
no stacking under autograd. The stacked path runs on CUDA by default; here STACK_DEVICES is widened to the CPU
so that CI runs it."""

from __future__ import annotations

import importlib

import pytest
import torch

from fusediff import UNet2DConditionModel, UNet2DModel
from fusediff.models.resnet import ResnetBlock2D
from support.configs import TINY_COND_UNET, TINY_UNET

TP = importlib.import_module("fusediff.models.time_projections")


def _models():
    torch.manual_seed(0)
    cond = UNet2DConditionModel(**TINY_COND_UNET).eval()
    torch.manual_seed(0)
    plain = UNet2DModel(**TINY_UNET).eval()
    return {"conditional": cond, "unconditional": plain}


def _call(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    if isinstance(model, UNet2DConditionModel):
        context = torch.randn(2, 5, c.cross_attention_dim, generator=g)
        return model(x, 10, encoder_hidden_states=context).sample
    return model(x, 10).sample


def _count_projection_calls(model) -> list[int]:
    calls = [0]
    for m in model.modules():
        if isinstance(m, ResnetBlock2D) and m.time_emb_proj is not None:
            m.time_emb_proj.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("kind", ["conditional", "unconditional"])
def test_stacked_projections_match_the_blocks(monkeypatch, kind):
    model = _models()[kind]
    calls = _count_projection_calls(model)
    blocks = sum(isinstance(m, ResnetBlock2D) and m.time_emb_proj is not None for m in model.modules())
    with torch.no_grad():
        monkeypatch.setattr(TP, "STACK_DEVICES", ())
        own = _call(model)
        assert calls[0] == blocks and getattr(model, TP.CACHE, None) is None
        monkeypatch.setattr(TP, "STACK_DEVICES", ("cpu",))
        stacked = _call(model)
    assert calls[0] == blocks, "with the stack, no block runs its own time_emb_proj"
    weight = getattr(model, TP.CACHE)[1]
    assert weight.shape[0] == sum(m.time_emb_proj.out_features for m in model.modules()
                                  if isinstance(m, ResnetBlock2D) and m.time_emb_proj is not None)
    diff = (stacked - own).abs().max().item()
    print(f"{kind}: max |stacked - own| = {diff:.3e}")
    torch.testing.assert_close(stacked, own, rtol=1e-5, atol=1e-5)


def test_stack_is_kept_then_rebuilt(monkeypatch):
    model = _models()["conditional"]
    monkeypatch.setattr(TP, "STACK_DEVICES", ("cpu",))
    with torch.no_grad():
        _call(model)
        first = getattr(model, TP.CACHE)[1]
        _call(model)
        assert getattr(model, TP.CACHE)[1] is first, "unchanged weights: the stack is reused"
        block = next(m for m in model.modules() if isinstance(m, ResnetBlock2D))
        block.time_emb_proj.weight.mul_(3)  # in place: the version counter moves
        got = _call(model)
        assert getattr(model, TP.CACHE)[1] is not first
        monkeypatch.setattr(TP, "STACK_DEVICES", ())
        expected = _call(model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_no_stack_under_autograd(monkeypatch):
    model = _models()["conditional"].train()
    calls = _count_projection_calls(model)
    monkeypatch.setattr(TP, "STACK_DEVICES", ("cpu",))
    _call(model).square().mean().backward()
    assert calls[0] > 0 and getattr(model, TP.CACHE, None) is None, "training runs each block's projection"
    assert all(m.time_emb_proj.weight.grad is not None for m in model.modules()
               if isinstance(m, ResnetBlock2D) and m.time_emb_proj is not None)


def test_time_projections_fall_back_for_blocks_not_stacked():
    temb = torch.randn(2, 6)
    tp = TP.TimeProjections(temb, {})
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=4, out_channels=4, temb_channels=6, groups=2)
    assert tp.of(block) is None
    torch.testing.assert_close(block._project_time(tp), block.time_emb_proj(torch.nn.functional.silu(temb)))


def test_a_replaced_projection_is_not_stacked(monkeypatch):
    """A block whose time_emb_proj is swapped for another module (an adapter) projects with that module."""

    class Doubled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 2 * self.inner(x)

    model = _models()["conditional"]
    monkeypatch.setattr(TP, "STACK_DEVICES", ("cpu",))
    with torch.no_grad():
        _call(model)  # the stack is built
        block = next(m for m in model.modules() if isinstance(m, ResnetBlock2D))
        block.time_emb_proj = Doubled(block.time_emb_proj)
        got = _call(model)
        monkeypatch.setattr(TP, "STACK_DEVICES", ())
        expected = _call(model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
