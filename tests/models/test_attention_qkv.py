"""Self-attention's stacked q/k/v projection (fusediff.models.attention): one matmul by [W_q; W_k; W_v]
(cross-attention's: [W_k; W_v] of the context) against the separate projections, the stacked weight kept while the weights are unchanged and rebuilt when
they change, and gradients through it. The stacked path runs on CUDA by default; here FUSED_QKV_DEVICES
is widened to the CPU so that CI runs it."""

from __future__ import annotations

import importlib

import pytest
import torch

from fusediff.models.attention import Attention

A = importlib.import_module("fusediff.models.attention")


def _attn(bias=False, seed=0):
    torch.manual_seed(seed)
    return Attention(32, heads=4, dim_head=8, bias=bias).eval()


def _outputs(attn, x, fused, monkeypatch):
    monkeypatch.setattr(A, "FUSED_QKV_DEVICES", ("cpu", "cuda") if fused else ())
    return attn(x)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(2, 32, 5, 3), (2, 7, 32)], ids=["map", "sequence"])
def test_stacked_projection_matches_three(monkeypatch, bias, shape):
    attn = _attn(bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        unfused = _outputs(attn, x, False, monkeypatch)
        fused = _outputs(attn, x, True, monkeypatch)
    diff = (fused - unfused).abs().max().item()
    print(f"max |stacked - three| = {diff:.3e}")
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    assert attn._qkv_cache is not None, "the stacked path ran"


def test_stacked_weight_is_kept_then_rebuilt(monkeypatch):
    attn = _attn(bias=True)
    x = torch.randn(2, 7, 32)
    monkeypatch.setattr(A, "FUSED_QKV_DEVICES", ("cpu",))
    with torch.no_grad():
        attn(x)
        first = attn._qkv_cache[1]
        attn(x)
        assert attn._qkv_cache[1] is first, "unchanged weights: the stacked weight is reused"
        attn.to_k.weight.mul_(2)  # an in-place change bumps the version counter
        got = attn(x)
    assert attn._qkv_cache[1] is not first
    monkeypatch.setattr(A, "FUSED_QKV_DEVICES", ())
    with torch.no_grad():
        expected = attn(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    attn.to_v.weight = torch.nn.Parameter(torch.randn_like(attn.to_v.weight))  # a new parameter object
    monkeypatch.setattr(A, "FUSED_QKV_DEVICES", ("cpu",))
    with torch.no_grad():
        got = attn(x)
    monkeypatch.setattr(A, "FUSED_QKV_DEVICES", ())
    with torch.no_grad():
        torch.testing.assert_close(got, attn(x), rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_three_projections(monkeypatch):
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    grads = []
    for fused in (False, True):
        attn = _attn(bias=True).double().train()
        _outputs(attn, x, fused, monkeypatch).square().sum().backward()
        grads.append({name: p.grad for name, p in attn.named_parameters() if "to_" in name})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("bias", [False, True])
def test_cross_attention_stacks_k_and_v(monkeypatch, bias):
    """Cross-attention: q from h alone, k and v from one matmul of the context by [W_k; W_v] (no q/k/v stack),
    equal to the separate projections; the stacked weight is rebuilt when a weight changes."""
    torch.manual_seed(0)
    attn = Attention(32, heads=4, dim_head=8, cross_attention_dim=16, bias=bias).eval()
    x, context = torch.randn(2, 7, 32), torch.randn(2, 5, 16)
    with torch.no_grad():
        monkeypatch.setattr(A, "FUSED_QKV_DEVICES", ())
        unfused = attn(x, context)
        assert attn._kv_cache is None
        monkeypatch.setattr(A, "FUSED_QKV_DEVICES", ("cpu",))
        fused = attn(x, context)
        assert attn._qkv_cache is None and attn._kv_cache is not None
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
        first = attn._kv_cache[1]
        assert first.shape == (2 * 32, 16)
        attn(x, context)
        assert attn._kv_cache[1] is first, "unchanged weights: the stacked weight is reused"
        attn.to_v.weight.mul_(-1)
        got = attn(x, context)
        monkeypatch.setattr(A, "FUSED_QKV_DEVICES", ())
        expected = attn(x, context)
    assert attn._kv_cache[1] is not first
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_cross_attention_gradients_reach_k_and_v(monkeypatch):
    x, context = torch.randn(2, 7, 32, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    grads = []
    for fused in (False, True):
        torch.manual_seed(0)
        attn = Attention(32, heads=4, dim_head=8, cross_attention_dim=16, bias=True).double().train()
        monkeypatch.setattr(A, "FUSED_QKV_DEVICES", ("cpu",) if fused else ())
        attn(x, context).square().sum().backward()
        grads.append({name: p.grad for name, p in attn.named_parameters() if "to_" in name})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_default_stacks_and_matches_three(monkeypatch, dtype):
    """On CUDA the stacked path is the default; against three matmuls it differs at most in rounding."""
    torch.manual_seed(0)
    attn = Attention(320, heads=8, dim_head=40, bias=False).eval().to("cuda", dtype)
    x = torch.randn(2, 320, 16, 16, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fused = attn(x)
        assert attn._qkv_cache is not None
        monkeypatch.setattr(A, "FUSED_QKV_DEVICES", ())
        unfused = attn(x)
    diff = (fused.float() - unfused.float()).abs().max().item()
    print(f"{dtype}: max |stacked - three| = {diff:.3e}")
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(fused, unfused, rtol=tol, atol=tol)


def test_a_capture_stacks_anew_and_leaves_the_cache_alone(monkeypatch):
    """Inside a CUDA-graph capture the stacking is recorded into the graph, so that a replay reads weights
    changed in place after the capture; the eager cache is neither read nor replaced there."""
    attn = _attn(bias=True)
    x = torch.randn(2, 7, 32)
    monkeypatch.setattr(A, "FUSED_QKV_DEVICES", ("cpu",))
    with torch.no_grad():
        attn(x)
        cached = attn._qkv_cache
        monkeypatch.setattr(A, "_capturing", lambda device: True)
        calls = []
        real_cat = torch.cat
        monkeypatch.setattr(torch, "cat", lambda *a, **k: calls.append(1) or real_cat(*a, **k))
        attn(x)
    assert calls, "a capture must record the stacking, not reuse the eager copy"
    assert attn._qkv_cache is cached, "a capture must not replace the eager cache with graph memory"
