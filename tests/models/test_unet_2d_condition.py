"""UNet2DConditionModel against diffusers 0.42.1: same parameter names, same outputs, interchangeable checkpoints.

Each parity test builds diffusers' model from a seed, copies its weights into fusediff's with
``strict=True`` and compares the outputs in fp32, relative to the output's largest magnitude; the
maximum difference is printed. The configs are tiny (<= 32 channels, 8x8 latents, 2-5 context
tokens) so that the file runs in seconds; they are run on one thread.
"""

from __future__ import annotations

import inspect

import diffusers
import pytest
import torch
from diffusers.models.unets import unet_2d_blocks as d_blocks

import fusediff.kernels
from fusediff.models import Transformer2DModel, UNet2DConditionModel, UNet2DConditionOutput
from fusediff.models.unet_2d_condition_blocks import get_down_block, get_mid_block, get_up_block
from support import parity
from support.parity import (assert_close, assert_same_seeded_init, one_thread,  # noqa: F401  (one_thread: autouse)
                            plain_config, run_both, saved_and_loaded_by_diffusers, saved_by_diffusers_and_loaded)

CROSS = 24  # context width

BASE = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, cross_attention_dim=CROSS,
            attention_head_dim=2)
THREE = dict(BASE, block_out_channels=(16, 32, 32), down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
             up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2)

CONFIGS = {
    # SD 1.x: conv projections, attention_head_dim is the head count (8 heads of width 2 at 16 channels)
    "sd1": dict(THREE, attention_head_dim=8, layers_per_block=2),
    # SD 2.x: linear projections, a head count per block, upcast attention
    "sd2": dict(THREE, use_linear_projection=True, attention_head_dim=(2, 4, 4), upcast_attention=True),
    # LDM-like, with the less common options
    "ldm_options": dict(BASE, flip_sin_to_cos=False, freq_shift=1, center_input_sample=True, downsample_padding=0,
                        norm_eps=1e-6, mid_block_scale_factor=2.0, transformer_layers_per_block=2, act_fn="mish",
                        resnet_time_scale_shift="scale_shift", time_embedding_act_fn="silu"),
    "only_cross_attention": dict(BASE, only_cross_attention=(True, False),
                                 down_block_types=("CrossAttnDownBlock2D",) * 2,
                                 up_block_types=("CrossAttnUpBlock2D",) * 2),
    "only_cross_attention_all": dict(BASE, only_cross_attention=True),
    "per_block_lists": dict(BASE, layers_per_block=(1, 2), transformer_layers_per_block=(1, 2),
                            cross_attention_dim=(CROSS, CROSS), attention_head_dim=(1, 4),
                            down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2),
    "nested_transformer_layers": dict(BASE, layers_per_block=(1, 2), transformer_layers_per_block=[[1], [2, 1]],
                                      reverse_transformer_layers_per_block=[[1, 2, 1], [1, 0]],
                                      down_block_types=("CrossAttnDownBlock2D",) * 2,
                                      up_block_types=("CrossAttnUpBlock2D",) * 2),
    "no_mid_block": dict(BASE, mid_block_type=None),
    "resnet_mid_block_unetres": dict(BASE, mid_block_type="UNetMidBlock2D",
                                     down_block_types=("UNetResCrossAttnDownBlock2D", "UNetResDownBlock2D")),
    "kernels_time_dim_gelu": dict(BASE, conv_in_kernel=1, conv_out_kernel=5, time_embedding_dim=40, act_fn="gelu"),
    "fourier_time": dict(BASE, time_embedding_type="fourier", flip_sin_to_cos=False),
    "one_block": dict(BASE, block_out_channels=(16,), down_block_types=("CrossAttnDownBlock2D",),
                      up_block_types=("CrossAttnUpBlock2D",)),
}
CLASS_CONFIGS = {
    "class_table": dict(BASE, num_class_embeds=10),
    "class_timestep": dict(BASE, class_embed_type="timestep"),
    "class_identity": dict(BASE, class_embed_type="identity"),
}


def build_pair(config: dict, seed: int = 0) -> tuple[torch.nn.Module, UNet2DConditionModel]:
    """diffusers' model from ``seed`` and fusediff's holding the same weights, both in eval mode."""
    return parity.build_pair(UNet2DConditionModel, config, seed)


def context(batch: int = 3, length: int = 5, width: int = CROSS) -> torch.Tensor:
    return torch.randn(batch, length, width)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity(name):
    theirs, ours = build_pair(CONFIGS[name])
    x = torch.randn(3, 4, 8, 8)  # odd batch
    t = torch.tensor([0.5, 2.0, 30.0]) if name == "fourier_time" else torch.tensor([1, 500, 999])
    a, b = run_both(theirs, ours, x, t, context())
    assert_close(a, b, name)


@pytest.mark.parametrize("name", list(CLASS_CONFIGS))
def test_parity_class_conditioning(name):
    theirs, ours = build_pair(CLASS_CONFIGS[name])
    labels = torch.randn(3, 64) if name == "class_identity" else torch.tensor([0, 7, 9])
    a, b = run_both(theirs, ours, torch.randn(3, 4, 8, 8), torch.tensor([10, 20, 30]), context(),
                    class_labels=labels)
    assert_close(a, b, name)


def test_parity_timestep_cond():
    theirs, ours = build_pair(dict(BASE, time_cond_proj_dim=6))
    a, b = run_both(theirs, ours, torch.randn(2, 4, 8, 8), 250, context(2), timestep_cond=torch.randn(2, 6))
    assert_close(a, b, "time_cond_proj_dim")


@pytest.mark.parametrize("size", [(9, 7), (5, 11), (3, 3)])
def test_odd_latent_sizes(size):
    """diffusers forwards the skip sizes to the upsamplers when H or W is not a multiple of 2^levels."""
    theirs, ours = build_pair(CONFIGS["sd2"])
    a, b = run_both(theirs, ours, torch.randn(2, 4, *size), 3, context(2))
    assert a.shape == (2, 4, *size)
    assert_close(a, b, f"latent {size}")


@pytest.fixture(scope="module")
def sd1_pair():
    return build_pair(CONFIGS["sd1"], seed=1)


@pytest.mark.parametrize("timestep", [7, 7.5, torch.tensor(7), torch.tensor([7]), torch.tensor([7, 7, 7]),
                                      torch.tensor(7.5), torch.tensor([7], dtype=torch.int32)],
                         ids=["int", "float", "0d", "len1", "batch", "0d_float", "int32"])
def test_timestep_forms(sd1_pair, timestep):
    theirs, ours = sd1_pair
    x, c = torch.randn(3, 4, 8, 8), context()
    a, b = run_both(theirs, ours, x, timestep, c)
    assert_close(a, b, f"timestep {timestep!r}")
    value = 7.5 if isinstance(timestep, float) or (torch.is_tensor(timestep) and timestep.is_floating_point()) else 7
    with torch.no_grad():  # one value is broadcast to the batch
        assert torch.equal(a, ours(x, torch.full((3,), value), c).sample)


def test_timestep_per_sample(sd1_pair):
    theirs, ours = sd1_pair
    x, c, t = torch.randn(3, 4, 8, 8), context(), torch.tensor([3, 400, 999])
    a, b = run_both(theirs, ours, x, t, c)
    assert_close(a, b, "per-sample timesteps")
    with torch.no_grad():  # each sample only sees its own timestep and context
        assert_close(ours(x[1:2], t[1:2], c[1:2]).sample, a[1:2], "sample 1 alone")


def test_return_types(sd1_pair):
    _, ours = sd1_pair
    x, c = torch.randn(1, 4, 8, 8), context(1)
    with torch.no_grad():
        out, tup = ours(x, 3, c), ours(x, 3, c, return_dict=False)
    assert isinstance(out, UNet2DConditionOutput) and isinstance(tup, tuple) and len(tup) == 1
    assert torch.equal(out.sample, tup[0]) and torch.equal(out[0], out["sample"])


def test_seeded_init_and_names_match_diffusers():
    for name in ("sd1", "sd2", "ldm_options", "per_block_lists"):
        assert_same_seeded_init(UNet2DConditionModel, CONFIGS[name], name)


def test_init_signature_and_config_match_diffusers():
    def signature(fn):
        params = list(inspect.signature(inspect.unwrap(fn)).parameters.values())[1:]
        return [(p.name, p.default, p.kind) for p in params]

    assert signature(UNet2DConditionModel.__init__) == signature(diffusers.UNet2DConditionModel.__init__)
    assert signature(UNet2DConditionModel.forward) == signature(diffusers.UNet2DConditionModel.forward)
    for name in ("sd2", "nested_transformer_layers"):
        theirs, ours = build_pair(CONFIGS[name])
        assert plain_config(ours.config) == plain_config(theirs.config)
        assert plain_config(UNet2DConditionModel.from_config(theirs.config).config) == plain_config(theirs.config)


def test_save_fusediff_load_diffusers(tmp_path):
    _, ours = build_pair(CLASS_CONFIGS["class_table"], seed=5)
    theirs = saved_and_loaded_by_diffusers(ours, tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    a, b = run_both(theirs, ours, torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), context(2),
                    class_labels=torch.tensor([1, 4]))
    assert_close(a, b, "fusediff save -> diffusers load")


def test_save_diffusers_load_fusediff(tmp_path):
    torch.manual_seed(6)
    theirs = diffusers.UNet2DConditionModel(**CONFIGS["sd2"]).eval()
    ours = saved_by_diffusers_and_loaded(theirs, tmp_path, UNet2DConditionModel)
    a, b = run_both(theirs, ours, torch.randn(2, 4, 8, 8), 250, context(2))
    assert_close(a, b, "diffusers save -> fusediff load")


def test_ref_backend_equals_default(sd1_pair):
    _, ours = sd1_pair
    x, c = torch.randn(2, 4, 9, 7), context(2)
    with torch.no_grad():
        default = ours(x, 11, c).sample
        with fusediff.kernels.use_backend("ref"):
            assert torch.equal(ours(x, 11, c).sample, default)


def test_model_runs_through_fusediff_kernels(monkeypatch, sd1_pair):
    """Every attention (self and cross), GroupNorm and the timestep embedding go through fusediff.kernels."""
    _, ours = sd1_pair
    calls = {"attention": [], "group_norm": 0, "timestep": 0}
    attention, group_norm, timestep_mlp = (fusediff.kernels.attention, fusediff.kernels.group_norm,
                                           fusediff.kernels.timestep_mlp)
    timestep_embedding = fusediff.kernels.timestep_embedding

    def spy_attention(q, k, v, *args, **kwargs):
        calls["attention"].append(k.shape[2])
        return attention(q, k, v, *args, **kwargs)

    def spy_group_norm(*args, **kwargs):
        calls["group_norm"] += 1
        return group_norm(*args, **kwargs)

    def spy_timestep(fn):
        def wrapper(*args, **kwargs):
            calls["timestep"] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(fusediff.kernels, "attention", spy_attention)
    monkeypatch.setattr(fusediff.kernels, "group_norm", spy_group_norm)
    monkeypatch.setattr(fusediff.kernels, "timestep_mlp", spy_timestep(timestep_mlp))
    monkeypatch.setattr(fusediff.kernels, "timestep_embedding", spy_timestep(timestep_embedding))
    with torch.no_grad():
        ours(torch.randn(1, 4, 8, 8), 3, context(1, length=5))
    blocks = sum(len(m.transformer_blocks) for m in ours.modules() if isinstance(m, Transformer2DModel))
    norms = sum(1 for m in ours.modules() if isinstance(m, torch.nn.GroupNorm))
    assert calls["attention"].count(5) == blocks and len(calls["attention"]) == 2 * blocks  # cross on 5 tokens
    assert calls["group_norm"] == norms and calls["timestep"] == 1


def test_autograd():
    _, ours = build_pair(dict(BASE, num_class_embeds=4, only_cross_attention=(True, False)))
    ours.train()
    x, c = torch.randn(2, 4, 8, 8, requires_grad=True), context(2).requires_grad_()
    ours(x, torch.tensor([3, 4]), c, class_labels=torch.tensor([1, 2])).sample.square().mean().backward()
    missing = [n for n, p in ours.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert x.grad.abs().sum() > 0 and c.grad.abs().sum() > 0


# -- blocks against diffusers' ----------------------------------------------------------------------

def test_cross_attention_blocks_match_diffusers():
    args = dict(num_layers=2, in_channels=8, out_channels=16, temb_channels=20, resnet_eps=1e-6, resnet_act_fn="silu",
                resnet_groups=4, num_attention_heads=2, cross_attention_dim=12, transformer_layers_per_block=(1, 2))
    temb, c = torch.randn(2, 20), torch.randn(2, 3, 12)
    torch.manual_seed(0)
    theirs = d_blocks.get_down_block("CrossAttnDownBlock2D", add_downsample=True, downsample_padding=1,
                                     attention_head_dim=8, **args).eval()
    ours = get_down_block("CrossAttnDownBlock2D", add_downsample=True, **args).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 8, 7, 5)
    with torch.no_grad():
        (h_a, res_a), (h_b, res_b) = ours(x, temb, encoder_hidden_states=c), theirs(x, temb, encoder_hidden_states=c)
    assert len(res_a) == len(res_b) == 3 and h_a.shape == (2, 16, 4, 3)
    for i, (a, b) in enumerate(zip((h_a, *res_a), (h_b, *res_b))):
        assert_close(a, b, f"CrossAttnDownBlock2D output {i}")

    up_args = dict(args, num_layers=3, prev_output_channel=16, transformer_layers_per_block=1)
    torch.manual_seed(1)
    theirs_up = d_blocks.get_up_block("CrossAttnUpBlock2D", add_upsample=True, attention_head_dim=8, **up_args).eval()
    ours_up = get_up_block("CrossAttnUpBlock2D", add_upsample=True, **up_args).eval()
    ours_up.load_state_dict(theirs_up.state_dict(), strict=True)
    skips = (torch.randn(2, 8, 4, 3), torch.randn(2, 16, 4, 3), torch.randn(2, 16, 4, 3))
    h = torch.randn(2, 16, 4, 3)
    with torch.no_grad():
        a = ours_up(h, skips, temb, (7, 5), encoder_hidden_states=c)
        b = theirs_up(h, skips, temb, encoder_hidden_states=c, upsample_size=(7, 5))
    assert a.shape == (2, 16, 7, 5)
    assert_close(a, b, "CrossAttnUpBlock2D with upsample_size")

    mid_args = dict(in_channels=16, temb_channels=20, resnet_eps=1e-6, resnet_act_fn="silu", resnet_groups=4,
                    num_attention_heads=2, cross_attention_dim=12, output_scale_factor=2.0)
    torch.manual_seed(2)
    theirs_mid = d_blocks.get_mid_block("UNetMidBlock2DCrossAttn", **mid_args).eval()
    ours_mid = get_mid_block("UNetMidBlock2DCrossAttn", **mid_args).eval()
    ours_mid.load_state_dict(theirs_mid.state_dict(), strict=True)
    with torch.no_grad():
        assert_close(ours_mid(h, temb, encoder_hidden_states=c), theirs_mid(h, temb, encoder_hidden_states=c), "mid")

    for factory, kind in ((get_down_block, "KCrossAttnDownBlock2D"), (get_up_block, "KCrossAttnUpBlock2D")):
        with pytest.raises(ValueError, match=f"{kind}.*not supported by fusediff's UNet2DConditionModel"):
            factory(kind, **({"add_downsample": True} if factory is get_down_block else {"add_upsample": True}))


# -- validation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, error, match", [
    (dict(addition_embed_type="text_time"), NotImplementedError, "addition_embed_type"),
    (dict(encoder_hid_dim_type="image_proj", encoder_hid_dim=32), NotImplementedError, "encoder_hid_dim_type"),
    (dict(num_attention_heads=4), NotImplementedError, "num_attention_heads"),
    (dict(dual_cross_attention=True), NotImplementedError, "dual_cross_attention"),
    (dict(class_embeddings_concat=True), ValueError, "class_embeddings_concat=True needs a class embedding"),
    (dict(timestep_post_act="silu"), NotImplementedError, "timestep_post_act"),
    (dict(attention_type="gated"), NotImplementedError, "attention_type"),
    (dict(class_embed_type="projection"), NotImplementedError, "class_embed_type"),
    (dict(class_embed_type="learned"), ValueError, "class_embed_type"),
    (dict(time_embedding_type="learned"), ValueError, "time_embedding_type"),
    (dict(mid_block_type="UNetMidBlock2DSimple"), ValueError, "mid_block_type"),
    (dict(down_block_types=("KCrossAttnDownBlock2D", "DownBlock2D")), ValueError, "KCrossAttnDownBlock2D"),
    (dict(up_block_types=("UpBlock2D",)), ValueError, "up_block_types has 1 entries"),
    (dict(block_out_channels=(16, 0)), ValueError, "block_out_channels"),
    (dict(layers_per_block=(1, 1, 1)), ValueError, "layers_per_block"),
    (dict(attention_head_dim=(2,)), ValueError, "attention_head_dim"),
    (dict(attention_head_dim=64), ValueError, "64 attention heads cannot split 16 channels"),
    (dict(cross_attention_dim=(CROSS, 0)), ValueError, "cross_attention_dim"),
    (dict(only_cross_attention=(True,)), ValueError, "only_cross_attention"),
    (dict(transformer_layers_per_block=[[1], [1]]), ValueError, "reverse_transformer_layers_per_block"),
    (dict(norm_num_groups=None), ValueError, "norm_num_groups"),
    (dict(norm_num_groups=12), ValueError, "norm_num_groups=12 must divide"),
    (dict(conv_in_kernel=2), ValueError, "conv_in_kernel"),
    (dict(act_fn="tanh"), ValueError, "act_fn"),
    (dict(time_embedding_act_fn="tanh"), ValueError, "time_embedding_act_fn"),
    (dict(time_embedding_type="fourier", time_embedding_dim=33), ValueError, "even"),
    (dict(dropout=2.0), ValueError, "dropout"),
])
def test_bad_config_raises(override, error, match):
    with pytest.raises(error, match=match):
        UNet2DConditionModel(**dict(BASE, **override))


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return UNet2DConditionModel(**dict(BASE, num_class_embeds=10, time_cond_proj_dim=6)).eval()


GOOD = dict(sample=torch.randn(2, 4, 8, 8), timestep=1, encoder_hidden_states=torch.randn(2, 3, CROSS),
            class_labels=torch.tensor([0, 1]), timestep_cond=torch.randn(2, 6))


@pytest.mark.parametrize("override, error, match", [
    (dict(sample=torch.randn(2, 3, 8, 8)), ValueError, r"shape \(B, 4, H, W\)"),
    (dict(sample=torch.randn(4, 8, 8)), ValueError, r"shape \(B, 4, H, W\)"),
    (dict(sample=torch.randn(2, 4, 0, 8)), ValueError, "none of them 0"),
    (dict(sample=torch.zeros(2, 4, 8, 8, dtype=torch.long)), TypeError, "floating"),
    (dict(encoder_hidden_states=torch.randn(2, 3, 16)), ValueError, r"encoder_hidden_states must be a \(2, L, 24\)"),
    (dict(encoder_hidden_states=torch.randn(1, 3, CROSS)), ValueError, "encoder_hidden_states"),
    (dict(encoder_hidden_states=torch.randn(2, CROSS)), ValueError, "encoder_hidden_states"),
    (dict(encoder_hidden_states=torch.randn(2, 3, CROSS, dtype=torch.float64)), ValueError, "dtype"),
    (dict(encoder_hidden_states=None), ValueError, "encoder_hidden_states"),
    (dict(timestep=torch.tensor([1, 2, 3])), ValueError, r"\(1,\) or \(2,\)"),
    (dict(timestep="5"), TypeError, "timestep"),
    (dict(timestep_cond=None), ValueError, "timestep_cond"),
    (dict(timestep_cond=torch.randn(2, 5)), ValueError, "timestep_cond"),
    (dict(class_labels=None), ValueError, "class-conditional"),
    (dict(class_labels=torch.tensor([0, 10])), ValueError, r"\[0, 10\)"),
    (dict(attention_mask=torch.ones(2, 64)), NotImplementedError, "attention_mask"),
    (dict(encoder_attention_mask=torch.ones(2, 3)), NotImplementedError, "encoder_attention_mask"),
    (dict(cross_attention_kwargs={"scale": 0.5}), NotImplementedError, "cross_attention_kwargs"),
    (dict(added_cond_kwargs={"text_embeds": torch.ones(2, 4)}), NotImplementedError, "added_cond_kwargs"),
    (dict(mid_block_additional_residual=torch.ones(2, 32, 4, 4)), NotImplementedError, "mid_block_additional"),
])
def test_bad_input_raises(small, override, error, match):
    with pytest.raises(error, match=match):
        small(**dict(GOOD, **override))


def test_empty_kwargs_accepted_and_timestep_cond_matters(small):
    with torch.no_grad():
        out = small(**GOOD).sample
        assert torch.equal(small(**GOOD, cross_attention_kwargs={}, added_cond_kwargs={}).sample, out)
        assert not torch.equal(small(**dict(GOOD, timestep_cond=torch.zeros(2, 6))).sample, out)


def test_timestep_cond_without_time_cond_proj_dim_raises(sd1_pair):
    with pytest.raises(ValueError, match="time_cond_proj_dim is set"):
        sd1_pair[1](torch.randn(1, 4, 8, 8), 1, context(1), timestep_cond=torch.randn(1, 6))


def test_class_labels_without_class_embedding_raise(sd1_pair):
    with pytest.raises(ValueError, match="no class embedding"):
        sd1_pair[1](torch.randn(1, 4, 8, 8), 1, context(1), class_labels=torch.tensor([0]))
