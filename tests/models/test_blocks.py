"""UNet building blocks against diffusers' modules of the same config, and routing through fusediff.kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models import attention_processor as d_attn
from diffusers.models import embeddings as d_emb
from diffusers.models import resnet as d_resnet
from diffusers.models.unets import unet_2d_blocks as d_blocks

import fusediff.kernels
from fusediff.models import (Attention, GaussianFourierProjection, GroupNorm, ResnetBlock2D, Timesteps, UNet2DModel,
                             get_down_block, get_up_block)


def copy_and_compare(theirs: torch.nn.Module, ours: torch.nn.Module, *inputs, rtol: float = 1e-5) -> None:
    """Load ``theirs`` weights into ``ours`` strictly, run both on ``inputs``, compare relative to the output size."""
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        a, b = ours(*inputs), theirs(*inputs)
    diff, scale = (a - b).abs().max().item(), b.abs().max().item()
    print(f"{type(ours).__name__}: max |diff| {diff:.2e} (max |out| {scale:.2e})")
    assert a.shape == b.shape and diff <= rtol * max(scale, 1e-6)


@pytest.mark.parametrize("activation", [None, "silu"])
def test_group_norm_module(activation):
    torch.manual_seed(0)
    ours = GroupNorm(4, 12, eps=1e-6, activation=activation)
    torch.nn.init.normal_(ours.weight)
    torch.nn.init.normal_(ours.bias)
    x = torch.randn(2, 12, 5, 7) * 3 + 1
    expected = F.group_norm(x, 4, ours.weight, ours.bias, 1e-6)
    expected = F.silu(expected) if activation else expected
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
    assert set(ours.state_dict()) == {"weight", "bias"}
    with pytest.raises(ValueError, match="activation"):
        GroupNorm(4, 12, activation="gelu")
    with pytest.raises(ValueError, match="divisible"):
        GroupNorm(5, 12)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(out_channels=24, time_embedding_norm="scale_shift"),
    dict(down=True),
    dict(up=True, non_linearity="mish", output_scale_factor=2.0),
    dict(out_channels=24, skip_time_act=True, groups_out=8),
], ids=["default", "scale_shift", "down", "up_mish", "skip_time_act"])
def test_resnet_block(kwargs):
    args = dict(in_channels=16, temb_channels=20, groups=4, eps=1e-6, **kwargs)
    torch.manual_seed(0)
    theirs = d_resnet.ResnetBlock2D(**args).eval()
    ours = ResnetBlock2D(**args).eval()
    copy_and_compare(theirs, ours, torch.randn(3, 16, 8, 8), torch.randn(3, 20))


@pytest.mark.parametrize("channels, head_dim, groups", [(32, 8, 8), (24, 16, None), (16, 16, 4)],
                         ids=["4_heads", "uneven_no_norm", "one_head"])
def test_attention(channels, head_dim, groups):
    torch.manual_seed(0)
    theirs = d_attn.Attention(channels, heads=channels // head_dim, dim_head=head_dim, rescale_output_factor=2.0,
                              eps=1e-6, norm_num_groups=groups, residual_connection=True, bias=True,
                              upcast_softmax=True, _from_deprecated_attn_block=True).eval()
    ours = Attention(channels, heads=channels // head_dim, dim_head=head_dim, rescale_output_factor=2.0, eps=1e-6,
                     norm_num_groups=groups).eval()
    copy_and_compare(theirs, ours, torch.randn(2, channels, 5, 3))


def test_embeddings():
    t = torch.tensor([0, 1, 17, 999])
    for flip, shift in ((True, 0), (False, 1)):
        with fusediff.kernels.use_backend("ref"):  # the interpreter's kernel differs in the last bit
            torch.testing.assert_close(Timesteps(32, flip, shift)(t), d_emb.Timesteps(32, flip, shift)(t))
    torch.manual_seed(0)
    theirs = d_emb.GaussianFourierProjection(embedding_size=8, scale=16)
    torch.manual_seed(0)
    ours = GaussianFourierProjection(embedding_size=8, scale=16)
    assert torch.equal(ours.weight, theirs.weight) and not ours.weight.requires_grad  # same seeded draw
    sigma = torch.tensor([0.01, 1.0, 50.0])
    torch.testing.assert_close(ours(sigma), theirs(sigma))


def test_block_factories_match_diffusers():
    args = dict(num_layers=2, in_channels=16, out_channels=32, temb_channels=20, resnet_eps=1e-6,
                resnet_act_fn="silu", resnet_groups=4, attention_head_dim=8, resnet_time_scale_shift="default")
    torch.manual_seed(0)
    theirs = d_blocks.get_down_block("AttnDownBlock2D", add_downsample=True, downsample_type="resnet", **args).eval()
    ours = get_down_block("AttnDownBlock2D", add_downsample=True, downsample_type="resnet", **args).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x, temb = torch.randn(2, 16, 8, 8), torch.randn(2, 20)
    with torch.no_grad():
        (h_a, res_a), (h_b, res_b) = ours(x, temb), theirs(x, temb)
    assert len(res_a) == len(res_b) == 3
    for a, b in zip((h_a, *res_a), (h_b, *res_b)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    up_args = dict(args, num_layers=3, prev_output_channel=32)
    torch.manual_seed(1)
    theirs_up = d_blocks.get_up_block("AttnUpBlock2D", add_upsample=True, **up_args).eval()
    ours_up = get_up_block("AttnUpBlock2D", add_upsample=True, **up_args).eval()
    skips = (torch.randn(2, 16, 4, 4), torch.randn(2, 32, 4, 4), torch.randn(2, 32, 4, 4))
    copy_and_compare(theirs_up, ours_up, torch.randn(2, 32, 4, 4), skips, temb)
    with pytest.raises(ValueError, match="AttnSkipUpBlock2D.*not supported"):
        get_up_block("AttnSkipUpBlock2D", add_upsample=True, **up_args)


def test_model_runs_through_fusediff_kernels(monkeypatch):
    """Every GroupNorm, the attention and the timestep embedding go through fusediff.kernels; SiLU is fused."""
    calls = {"silu": 0, "plain": 0, "attention": 0, "timestep": 0}
    group_norm, attention, timestep_embedding = (fusediff.kernels.group_norm, fusediff.kernels.attention,
                                                 fusediff.kernels.timestep_embedding)

    def counting_group_norm(*args, activation=None, **kwargs):
        calls["silu" if activation == "silu" else "plain"] += 1
        return group_norm(*args, activation=activation, **kwargs)

    def counting_attention(q, *args, **kwargs):
        assert q.dim() == 4  # (B, H, S, D)
        calls["attention"] += 1
        return attention(q, *args, **kwargs)

    def counting_timestep_embedding(*args, **kwargs):
        calls["timestep"] += 1
        return timestep_embedding(*args, **kwargs)

    monkeypatch.setattr(fusediff.kernels, "group_norm", counting_group_norm)
    monkeypatch.setattr(fusediff.kernels, "attention", counting_attention)
    monkeypatch.setattr(fusediff.kernels, "timestep_embedding", counting_timestep_embedding)
    timestep_mlp = fusediff.kernels.timestep_mlp  # the embedding and its MLP in one op where the kernels run

    def counting_timestep_mlp(*args, **kwargs):
        calls["timestep"] += 1
        return timestep_mlp(*args, **kwargs)

    monkeypatch.setattr(fusediff.kernels, "timestep_mlp", counting_timestep_mlp)
    model = UNet2DModel(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    resnets = sum(1 for m in model.modules() if isinstance(m, ResnetBlock2D))
    attentions = sum(1 for m in model.modules() if isinstance(m, Attention))
    with torch.no_grad():
        model(torch.randn(1, 3, 8, 8), 3)
    # two fused GroupNorm+SiLU per resnet and one at the output; one plain GroupNorm per attention
    assert calls == {"silu": 2 * resnets + 1, "plain": attentions, "attention": attentions, "timestep": 1}
    assert not any(isinstance(m, torch.nn.GroupNorm) and not isinstance(m, GroupNorm) for m in model.modules())
