"""UNet2DConditionModel with DeepFloyd IF's features against diffusers 0.42.1: parity, checkpoints, blocks, errors.

The configs are diffusers' own IF test components (``_get_dummy_components`` and
``_get_superresolution_dummy_components`` in diffusers' tests/pipelines/deepfloyd_if/__init__.py),
shrunk variants with the keys diffusers' scripts/convert_if.py writes for the released IF-I and
IF-II checkpoints (``resnet_skip_time_act``, ``resnet_out_scale_factor`` = ``mid_block_scale_factor``
= 1/0.7071, ``only_cross_attention``, per-block ``layers_per_block``, ``time_embedding_dim``), and
variants of the options around them. As in test_unet_2d_condition.py, diffusers' model is built
from a seed, its weights are copied into fusediff's with ``strict=True``, and fp32 CPU outputs are
compared relative to the output's largest magnitude (printed); one thread.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers.models import attention_processor as d_attn
from diffusers.models import embeddings as d_emb
from diffusers.models import resnet as d_resnet
from diffusers.models.unets import unet_2d_blocks as d_blocks

import fusediff.kernels
from fusediff.models import ResnetBlock2D, UNet2DConditionModel
from fusediff.models.attention_added_kv import AddedKVAttention
from fusediff.models.embeddings import TextTimeEmbedding
from fusediff.models.unet_2d_condition_blocks import get_down_block, get_mid_block, get_up_block
from support import parity
from support.parity import (assert_close, assert_same_seeded_init, one_thread,  # noqa: F401  (one_thread: autouse)
                            plain_config, run_both, saved_and_loaded_by_diffusers, saved_by_diffusers_and_loaded)

TEXT = 32  # width of the (T5-like) text tokens

# diffusers' IFPipeline test UNet (stage I: 3 -> 6 channels, eps and the learned-range variance)
STAGE_1 = dict(sample_size=32, layers_per_block=1, block_out_channels=[32, 64],
               down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
               mid_block_type="UNetMidBlock2DSimpleCrossAttn",
               up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"], in_channels=3, out_channels=6,
               cross_attention_dim=32, encoder_hid_dim=TEXT, attention_head_dim=8, addition_embed_type="text",
               addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
               resnet_time_scale_shift="scale_shift", act_fn="gelu")
# diffusers' IFSuperResolutionPipeline test UNet (stage II: the upsampled image concatenated, noise level as class)
STAGE_2 = dict(STAGE_1, layers_per_block=[1, 2], in_channels=6, class_embed_type="timestep",
               mid_block_scale_factor=1.414, time_embedding_act_fn="gelu", time_embedding_dim=32)
SQRT2 = 1 / 0.7071  # convert_if.py's resnet_out_scale_factor and mid_block_scale_factor of stage II

CONFIGS = {
    "if_stage_1": STAGE_1,
    "if_stage_2": STAGE_2,
    # convert_if.py's stage-I keys: DownBlock2D where resblock_updown is off, the default 64 pooling heads
    "released_stage_1": dict(sample_size=16, in_channels=3, out_channels=6, block_out_channels=(32, 64, 64),
                             layers_per_block=2, cross_attention_dim=64, encoder_hid_dim=64, attention_head_dim=16,
                             use_linear_projection=False, class_embed_type=None, upcast_attention=False,
                             down_block_types=("DownBlock2D", "SimpleCrossAttnDownBlock2D",
                                               "SimpleCrossAttnDownBlock2D"),
                             up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "UpBlock2D"),
                             cross_attention_norm="group_norm", mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                             addition_embed_type="text", act_fn="gelu", resnet_time_scale_shift="scale_shift"),
    # convert_if.py's stage-II keys: skip_time_act, the 1/0.7071 scales, only_cross_attention for all (mid too)
    "released_stage_2": dict(STAGE_2, block_out_channels=(32, 32, 64), layers_per_block=(1, 2, 2),
                             down_block_types=("ResnetDownsampleBlock2D",) * 2 + ("SimpleCrossAttnDownBlock2D",),
                             up_block_types=("SimpleCrossAttnUpBlock2D",) + ("ResnetUpsampleBlock2D",) * 2,
                             time_embedding_dim=64, resnet_skip_time_act=True, resnet_out_scale_factor=SQRT2,
                             mid_block_scale_factor=SQRT2, only_cross_attention=True),
    # per-block head widths: diffusers gives up block i entry i (not n - 1 - i); heads change no weight shape
    "head_width_per_block": dict(STAGE_1, down_block_types=["SimpleCrossAttnDownBlock2D"] * 2,
                                 up_block_types=["SimpleCrossAttnUpBlock2D"] * 2, attention_head_dim=(8, 32)),
    "only_cross_attention_lists": dict(STAGE_1, down_block_types=["SimpleCrossAttnDownBlock2D"] * 2,
                                       up_block_types=["SimpleCrossAttnUpBlock2D"] * 2,
                                       only_cross_attention=(True, False), mid_block_only_cross_attention=True),
    # no encoder_hid_dim: the text is pooled at cross_attention_dim and reaches the attentions unprojected
    "no_encoder_hid_dim": dict(STAGE_1, encoder_hid_dim=None, cross_attention_norm=None, act_fn="silu",
                               addition_embed_type_num_heads=4),
    "projection_only": dict(STAGE_1, addition_embed_type=None, encoder_hid_dim=48, encoder_hid_dim_type="text_proj"),
    "mixed_with_transformer_blocks": dict(STAGE_2, down_block_types=["CrossAttnDownBlock2D",
                                                                     "SimpleCrossAttnDownBlock2D"],
                                          up_block_types=["SimpleCrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                                          attention_head_dim=4, resnet_skip_time_act=True,
                                          resnet_out_scale_factor=2.0),
    "class_concat_timestep": dict(STAGE_2, addition_embed_type=None, class_embeddings_concat=True),
    "class_concat_table": dict(STAGE_1, addition_embed_type=None, class_embeddings_concat=True, num_class_embeds=10,
                               mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=4),
}


# released_stage_2 amplifies rounding more (1/0.7071 at every resnet and the mid block): measured against
# diffusers run in float64, fusediff's fp32 output is off by 6.6e-6 and diffusers' own by 8.1e-6 (relative)
RTOL = {"released_stage_2": 3e-5}


def text_width(config: dict) -> int:
    return config.get("encoder_hid_dim") or config["cross_attention_dim"]


def inputs(config: dict, batch: int = 3, size: int = 8) -> tuple[tuple, dict]:
    """(sample, timesteps, context) and the class labels the config needs."""
    x = torch.randn(batch, config["in_channels"], size, size)
    t = torch.tensor([1, 500, 999][:batch])
    c = torch.randn(batch, 5, text_width(config))
    kwargs = {}
    if config.get("class_embed_type") == "timestep":
        kwargs["class_labels"] = torch.tensor([0, 250, 999][:batch])  # stage II's noise level
    elif config.get("num_class_embeds"):
        kwargs["class_labels"] = torch.tensor([0, 3, 9][:batch])
    return (x, t, c), kwargs


def build_pair(config: dict, seed: int = 0, processor=None):
    theirs, ours = parity.build_pair(UNet2DConditionModel, config, seed)
    if processor is not None:
        theirs.set_attn_processor(processor)
    return theirs, ours


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity(name):
    theirs, ours = build_pair(CONFIGS[name])
    args, kwargs = inputs(CONFIGS[name])
    a, b = run_both(theirs, ours, *args, **kwargs)
    assert_close(a, b, name, rtol=RTOL.get(name, parity.RTOL))


@pytest.mark.parametrize("name", ["if_stage_1", "if_stage_2"])
def test_parity_with_the_classic_processor(name):
    """diffusers' IF tests pin AttnAddedKVProcessor (bmm and softmax) instead of the SDPA default."""
    theirs, ours = build_pair(CONFIGS[name], processor=d_attn.AttnAddedKVProcessor())
    args, kwargs = inputs(CONFIGS[name], batch=2, size=16)
    a, b = run_both(theirs, ours, *args, **kwargs)
    assert_close(a, b, f"{name} / AttnAddedKVProcessor")


def test_noise_level_and_text_matter():
    """The stage-II class label (noise level) and the pooled text change the output, and each sample's are its own."""
    _, ours = build_pair(STAGE_2, seed=2)
    (x, t, c), kwargs = inputs(STAGE_2)
    with torch.no_grad():
        out = ours(x, t, c, **kwargs).sample
        assert not torch.allclose(ours(x, t, c, class_labels=torch.tensor([999, 0, 250])).sample, out)
        assert not torch.allclose(ours(x, t, torch.randn_like(c), **kwargs).sample, out)
        alone = ours(x[1:2], t[1:2], c[1:2], class_labels=kwargs["class_labels"][1:2]).sample
    assert_close(alone, out[1:2], "sample 1 alone")


def test_seeded_init_and_names_match_diffusers():
    for name in ("if_stage_1", "released_stage_2", "only_cross_attention_lists", "class_concat_table"):
        assert_same_seeded_init(UNet2DConditionModel, CONFIGS[name], name)


def test_config_matches_diffusers():
    """diffusers records encoder_hid_dim_type="text_proj" when only encoder_hid_dim is given; so does fusediff."""
    for name in ("if_stage_1", "released_stage_2", "no_encoder_hid_dim"):
        theirs, ours = build_pair(CONFIGS[name])
        assert plain_config(ours.config) == plain_config(theirs.config), name
        assert plain_config(UNet2DConditionModel.from_config(theirs.config).config) == plain_config(theirs.config)
    assert ours.config.encoder_hid_dim_type is None
    assert UNet2DConditionModel(**STAGE_1).config.encoder_hid_dim_type == "text_proj"


def test_save_diffusers_load_fusediff(tmp_path):
    torch.manual_seed(6)
    theirs = diffusers.UNet2DConditionModel(**CONFIGS["released_stage_2"]).eval()
    ours = saved_by_diffusers_and_loaded(theirs, tmp_path, UNet2DConditionModel)
    args, kwargs = inputs(CONFIGS["released_stage_2"], batch=2)
    a, b = run_both(theirs, ours, *args, **kwargs)
    assert_close(a, b, "diffusers save -> fusediff load (stage II)")


def test_save_fusediff_load_diffusers(tmp_path):
    _, ours = build_pair(STAGE_1, seed=5)
    theirs = saved_and_loaded_by_diffusers(ours, tmp_path)
    args, kwargs = inputs(STAGE_1, batch=2, size=16)
    a, b = run_both(theirs, ours, *args, **kwargs)
    assert_close(a, b, "fusediff save -> diffusers load (stage I)")


def test_ref_backend_equals_default():
    _, ours = build_pair(STAGE_2)
    args, kwargs = inputs(STAGE_2, batch=2)
    with torch.no_grad():
        default = ours(*args, **kwargs).sample
        with fusediff.kernels.use_backend("ref"):
            assert torch.equal(ours(*args, **kwargs).sample, default)


def test_model_runs_through_fusediff_kernels(monkeypatch):
    """Every added-KV attention, the text pooling, every GroupNorm and the two LayerNorms go through the kernels."""
    _, ours = build_pair(STAGE_1)
    calls = {"attention": [], "group_norm": 0, "layer_norm": 0}
    attention, group_norm, layer_norm = fusediff.kernels.attention, fusediff.kernels.group_norm, \
        fusediff.kernels.layer_norm

    def spy_attention(q, k, v, *args, **kwargs):
        calls["attention"].append((q.shape[2], k.shape[2]))
        return attention(q, k, v, *args, **kwargs)

    def spy(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(fusediff.kernels, "attention", spy_attention)
    monkeypatch.setattr(fusediff.kernels, "group_norm", spy("group_norm", group_norm))
    monkeypatch.setattr(fusediff.kernels, "layer_norm", spy("layer_norm", layer_norm))
    (x, t, c), _ = inputs(STAGE_1, batch=1, size=8)
    with torch.no_grad():
        ours(x, t, c)
    attentions = [m for m in ours.modules() if isinstance(m, AddedKVAttention)]
    norms = sum(1 for m in ours.modules() if isinstance(m, torch.nn.GroupNorm))
    assert len(calls["attention"]) == len(attentions) + 1 and calls["attention"][0] == (1, 6)  # pooling: 1 query
    assert all(k == q + 5 for q, k in calls["attention"][1:])  # each position sees 5 tokens + all positions
    assert calls["group_norm"] == norms and calls["layer_norm"] == 2


def test_autograd():
    _, ours = build_pair(CONFIGS["only_cross_attention_lists"])
    ours.train()
    (x, t, c), kwargs = inputs(STAGE_1, batch=2)
    x.requires_grad_(), c.requires_grad_()
    ours(x, t, c, **kwargs).sample.square().mean().backward()
    missing = [n for n, p in ours.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert x.grad.abs().sum() > 0 and c.grad.abs().sum() > 0


# -- parts against diffusers' ---------------------------------------------------------------------

def copy_and_compare(theirs, ours, *args, what: str, **kwargs) -> None:
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict()), what
    with torch.no_grad():
        assert_close(ours(*args, **kwargs), theirs(*args, **kwargs), what)


@pytest.mark.parametrize("only_cross, norm, processor", [
    (False, None, None), (False, "group_norm", None), (True, "group_norm", None),
    (False, "group_norm", d_attn.AttnAddedKVProcessor()), (True, None, d_attn.AttnAddedKVProcessor()),
], ids=["self+ctx", "ctx_group_norm", "only_cross", "classic_processor", "only_cross_classic"])
def test_added_kv_attention(only_cross, norm, processor):
    torch.manual_seed(0)
    theirs = d_attn.Attention(query_dim=48, cross_attention_dim=48, heads=3, dim_head=16, added_kv_proj_dim=64,
                              norm_num_groups=4, bias=True, upcast_softmax=True, only_cross_attention=only_cross,
                              cross_attention_norm=norm,
                              processor=processor or d_attn.AttnAddedKVProcessor2_0()).eval()
    torch.manual_seed(0)
    ours = AddedKVAttention(48, heads=3, dim_head=16, added_kv_proj_dim=64, norm_num_groups=4,
                            only_cross_attention=only_cross, cross_attention_norm=norm).eval()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    x, c = torch.randn(2, 48, 5, 3) * 2 + 1, torch.randn(2, 7, 64)
    copy_and_compare(theirs, ours, x, encoder_hidden_states=c, what=f"AddedKVAttention {only_cross} {norm}")


def test_text_time_embedding():
    torch.manual_seed(0)
    theirs = d_emb.TextTimeEmbedding(48, 40, num_heads=6).eval()
    torch.manual_seed(0)
    ours = TextTimeEmbedding(48, 40, num_heads=6).eval()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):  # not the identity LayerNorm
        torch.nn.init.normal_(theirs.state_dict()[name])
    copy_and_compare(theirs, ours, torch.randn(3, 9, 48) * 3, what="TextTimeEmbedding")


@pytest.mark.parametrize("kwargs", [
    dict(time_embedding_norm="scale_shift", non_linearity="gelu"),
    dict(time_embedding_norm="scale_shift", non_linearity="gelu", skip_time_act=True, output_scale_factor=SQRT2,
         down=True),
    dict(time_embedding_norm="scale_shift", non_linearity="gelu", skip_time_act=True, up=True, out_channels=24),
], ids=["scale_shift_gelu", "skip_time_act_scaled_down", "skip_time_act_up"])
def test_resnet_block_if_options(kwargs):
    args = dict(in_channels=16, temb_channels=20, groups=4, eps=1e-5, **kwargs)
    torch.manual_seed(0)
    theirs = d_resnet.ResnetBlock2D(**args).eval()
    ours = ResnetBlock2D(**args).eval()
    copy_and_compare(theirs, ours, torch.randn(2, 16, 6, 6), torch.randn(2, 20), what=str(kwargs))


BLOCK = dict(num_layers=2, in_channels=16, out_channels=32, temb_channels=20, resnet_eps=1e-5, resnet_act_fn="gelu",
             resnet_groups=4, resnet_time_scale_shift="scale_shift", resnet_skip_time_act=True,
             resnet_out_scale_factor=SQRT2, cross_attention_dim=32, cross_attention_norm="group_norm")


@pytest.mark.parametrize("kind, only_cross", [("ResnetDownsampleBlock2D", False), ("SimpleCrossAttnDownBlock2D", False),
                                              ("SimpleCrossAttnDownBlock2D", True)])
def test_down_blocks(kind, only_cross):
    temb, c, x = torch.randn(2, 20), torch.randn(2, 3, 32), torch.randn(2, 16, 8, 6)
    torch.manual_seed(0)
    theirs = d_blocks.get_down_block(kind, add_downsample=True, attention_head_dim=8, only_cross_attention=only_cross,
                                     **BLOCK).eval()
    ours = get_down_block(kind, add_downsample=True, attention_head_dim=8, only_cross_attention=only_cross,
                          **BLOCK).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    context = {"encoder_hidden_states": c} if kind.startswith("Simple") else {}
    with torch.no_grad():
        (h_a, res_a), (h_b, res_b) = ours(x, temb, **context), theirs(x, temb, **context)
    assert len(res_a) == len(res_b) == 3 and h_a.shape == (2, 32, 4, 3)
    for i, (a, b) in enumerate(zip((h_a, *res_a), (h_b, *res_b))):
        assert_close(a, b, f"{kind} output {i}")


@pytest.mark.parametrize("kind", ["ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"])
def test_up_blocks(kind):
    args = dict(BLOCK, num_layers=3, prev_output_channel=32)
    temb, c = torch.randn(2, 20), torch.randn(2, 3, 32)
    skips = (torch.randn(2, 16, 4, 3), torch.randn(2, 32, 4, 3), torch.randn(2, 32, 4, 3))
    torch.manual_seed(1)
    theirs = d_blocks.get_up_block(kind, add_upsample=True, attention_head_dim=16, **args).eval()
    ours = get_up_block(kind, add_upsample=True, attention_head_dim=16, **args).eval()
    context = {"encoder_hidden_states": c} if kind.startswith("Simple") else {}
    copy_and_compare(theirs, ours, torch.randn(2, 32, 4, 3), skips, temb, **context, what=kind)


def test_simple_mid_block():
    args = dict(in_channels=32, temb_channels=20, resnet_eps=1e-5, resnet_act_fn="gelu", resnet_groups=4,
                output_scale_factor=SQRT2, cross_attention_dim=24, attention_head_dim=8,
                resnet_time_scale_shift="scale_shift", resnet_skip_time_act=True)
    torch.manual_seed(2)
    theirs = d_blocks.get_mid_block("UNetMidBlock2DSimpleCrossAttn", mid_block_only_cross_attention=True,
                                    **args).eval()
    ours = get_mid_block("UNetMidBlock2DSimpleCrossAttn", only_cross_attention=True, **args).eval()
    copy_and_compare(theirs, ours, torch.randn(2, 32, 3, 5), torch.randn(2, 20),
                     encoder_hidden_states=torch.randn(2, 4, 24), what="UNetMidBlock2DSimpleCrossAttn")


# -- validation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, error, match", [
    (dict(encoder_hid_dim_type="text_image_proj"), NotImplementedError, "encoder_hid_dim_type"),
    (dict(encoder_hid_dim_type="image_proj"), NotImplementedError, "encoder_hid_dim_type"),
    (dict(encoder_hid_dim_type="bogus"), ValueError, "encoder_hid_dim_type must be one of"),
    (dict(encoder_hid_dim=None, encoder_hid_dim_type="text_proj"), ValueError, "needs encoder_hid_dim"),
    (dict(encoder_hid_dim=0), ValueError, "encoder_hid_dim must be a positive int"),
    (dict(cross_attention_dim=(32, 32)), ValueError, "cross_attention_dim, which must then be one int"),
    (dict(addition_embed_type="text_time"), NotImplementedError, "addition_embed_type"),
    (dict(addition_embed_type="image"), NotImplementedError, "addition_embed_type"),
    (dict(addition_embed_type="texts"), ValueError, "addition_embed_type must be one of"),
    (dict(addition_embed_type_num_heads=5), ValueError, "addition_embed_type_num_heads=5 must divide the width 32"),
    (dict(addition_embed_type_num_heads=0), ValueError, "addition_embed_type_num_heads"),
    (dict(cross_attention_norm="layer_norm"), NotImplementedError, "cross_attention_norm"),
    (dict(cross_attention_norm="batch_norm"), ValueError, "cross_attention_norm must be one of"),
    (dict(cross_attention_dim=24, encoder_hid_dim=None, addition_embed_type_num_heads=4), ValueError,
     "cross_attention_dim=24 is not a multiple of 32"),
    (dict(attention_head_dim=12), ValueError, "attention_head_dim=12 .* must divide their 64 channels"),
    (dict(attention_head_dim=128), ValueError, "attention_head_dim=128"),
    (dict(resnet_skip_time_act=1), ValueError, "resnet_skip_time_act must be a bool"),
    (dict(resnet_out_scale_factor=0), ValueError, "resnet_out_scale_factor must be a number > 0"),
    (dict(mid_block_scale_factor=-1.0), ValueError, "mid_block_scale_factor"),
    (dict(mid_block_only_cross_attention="yes"), ValueError, "mid_block_only_cross_attention"),
    (dict(class_embeddings_concat=True), ValueError, "needs a class embedding"),
    (dict(class_embeddings_concat=True, class_embed_type="timestep"), ValueError, "cannot be added to"),
    (dict(class_embeddings_concat="no"), ValueError, "class_embeddings_concat must be a bool"),
    (dict(class_embed_type="projection"), NotImplementedError, "class_embed_type"),
    (dict(down_block_types=["KDownBlock2D", "SimpleCrossAttnDownBlock2D"]), ValueError, "KDownBlock2D"),
    (dict(up_block_types=["SimpleCrossAttnUpBlock2D", "AttnUpBlock2D"]), ValueError, "AttnUpBlock2D"),
])
def test_bad_config_raises(override, error, match):
    with pytest.raises(error, match=match):
        UNet2DConditionModel(**dict(STAGE_1, **override))


@pytest.fixture(scope="module")
def stage_2():
    torch.manual_seed(0)
    return UNet2DConditionModel(**STAGE_2).eval()


GOOD = dict(sample=torch.randn(2, 6, 8, 8), timestep=3, encoder_hidden_states=torch.randn(2, 4, TEXT),
            class_labels=torch.tensor([10, 20]))


@pytest.mark.parametrize("override, error, match", [
    (dict(encoder_hidden_states=torch.randn(2, 4, 16)), ValueError, r"encoder_hidden_states must be a \(2, L, 32\)"),
    (dict(encoder_hidden_states=None), ValueError, "encoder_hidden_states"),
    (dict(class_labels=None), ValueError, "class-conditional"),
    (dict(class_labels=torch.tensor([1, 2, 3])), ValueError, "class_labels"),
    (dict(sample=torch.randn(2, 6, 9, 8)), ValueError, "multiples of 2"),
    (dict(encoder_attention_mask=torch.ones(2, 4)), NotImplementedError, "encoder_attention_mask"),
])
def test_bad_input_raises(stage_2, override, error, match):
    with pytest.raises(error, match=match):
        stage_2(**dict(GOOD, **override))


def test_good_input_runs(stage_2):
    with torch.no_grad():
        assert stage_2(**GOOD).sample.shape == (2, 6, 8, 8)
