"""fusediff.patch on HF diffusers' Stable-Diffusion-like models on a CUDA device: the patched model in
fp16/bf16 (Triton GroupNorm+SiLU, attention, timestep embedding) against diffusers' own model in the
same precision and in fp64, under the house tolerance rule; channels-last included."""

from __future__ import annotations

import copy

import diffusers
import pytest
import torch
from support.spy import record_calls
from support.tolerance import assert_within_ref_error

import fusediff
from fusediff.kernels import _backend
from fusediff.patching import report
from support.configs import SD_SHAPED_UNETS

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]
UNETS = SD_SHAPED_UNETS
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(64, 128),
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
           layers_per_block=1, norm_num_groups=32)


def three_copies(model: torch.nn.Module, dtype: torch.dtype, memory_format=torch.contiguous_format):
    """(fp64 reference, diffusers' model in ``dtype``, the patched model in ``dtype``) on CUDA."""
    model = model.to("cuda").eval()
    hi = copy.deepcopy(model).double()
    low = copy.deepcopy(model).to(dtype=dtype, memory_format=memory_format)
    fused = fusediff.patch(copy.deepcopy(model).to(dtype=dtype, memory_format=memory_format))
    assert report(fused).skipped == {}
    return hi, low, fused


def launches(monkeypatch):
    """Calls of the Triton launchers of group_norm, attention and timestep_embedding, by op."""
    return {op: record_calls(monkeypatch, _backend.triton_module(op), "launch")
            for op in ("group_norm", "attention", "timestep_embedding")}


@pytest.mark.parametrize("name", list(UNETS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_patched_unet_2d_condition_within_tolerance(monkeypatch, name, dtype):
    torch.manual_seed(0)
    hi, low, fused = three_copies(diffusers.UNet2DConditionModel(**UNETS[name]), dtype)
    x = torch.randn(2, 4, 32, 32, device="cuda")
    cond = torch.randn(2, 77, 96, device="cuda")
    t = torch.tensor([999, 10], device="cuda")
    calls = launches(monkeypatch)
    with torch.no_grad():
        expected = hi(x.double(), t, cond.double()).sample
        ref = low(x.to(dtype), t, cond.to(dtype)).sample
        got = fused(x.to(dtype), t, cond.to(dtype)).sample
    assert all(calls.values()), {op: len(c) for op, c in calls.items()}
    assert_within_ref_error(got, ref, expected, f"patched diffusers UNet2DConditionModel {name} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_patched_autoencoder_kl_within_tolerance(monkeypatch, dtype):
    torch.manual_seed(0)
    hi, low, fused = three_copies(diffusers.AutoencoderKL(**VAE), dtype)
    image = torch.rand(1, 3, 64, 64, device="cuda") * 2 - 1
    calls = launches(monkeypatch)
    with torch.no_grad():
        z = hi.encode(image.double()).latent_dist.mode()
        expected = hi.decode(z).sample
        ref = low.decode(low.encode(image.to(dtype)).latent_dist.mode()).sample
        got = fused.decode(fused.encode(image.to(dtype)).latent_dist.mode()).sample
    assert len(calls["attention"]) == 2 and calls["group_norm"]  # the two mid-block attentions (D = 128)
    assert_within_ref_error(got, ref, expected, f"patched diffusers AutoencoderKL {dtype}")


def test_patched_unet_channels_last(monkeypatch):
    dtype = torch.float16
    torch.manual_seed(0)
    hi, low, fused = three_copies(diffusers.UNet2DConditionModel(**UNETS["sd1"]), dtype, torch.channels_last)
    x = torch.randn(2, 4, 32, 32, device="cuda")
    cond = torch.randn(2, 77, 96, device="cuda")
    t = torch.tensor([500, 20], device="cuda")
    calls = launches(monkeypatch)
    x_low = x.to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = hi(x.double(), t, cond.double()).sample
        ref = low(x_low, t, cond.to(dtype)).sample
        got = fused(x_low, t, cond.to(dtype)).sample
    layouts = [c[0].is_contiguous(memory_format=torch.channels_last) for c in calls["group_norm"] if c[0].dim() == 4]
    assert layouts and all(layouts), f"{layouts.count(False)} of {len(layouts)} GroupNorm inputs were not channels-last"
    assert_within_ref_error(got, ref, expected, "patched UNet, channels-last fp16")
