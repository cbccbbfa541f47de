"""UNet2DModel against diffusers 0.42.1: same parameter names, same outputs, interchangeable checkpoints.

Each parity test builds diffusers' model from a seed, copies its weights into fusediff's with
``strict=True`` and compares the outputs in fp32 (relative to the output's largest magnitude);
the maximum difference is printed. Models are small (16x16, <= 64 channels) to stay fast on CPU.
"""

from __future__ import annotations

import inspect

import diffusers
import pytest
import torch
from support import parity
from support.parity import (assert_close, assert_same_seeded_init, plain_config, run_both,
                            save_with_legacy_attention_names, saved_and_loaded_by_diffusers,
                            saved_by_diffusers_and_loaded)

from fusediff.models import UNet2DModel, UNet2DOutput, convert_legacy_attention_keys

BASE = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8, attention_head_dim=8)

CONFIGS = {
    "ddpm": dict(BASE, layers_per_block=2),
    "three_levels_one_head": dict(BASE, block_out_channels=(16, 32, 32), attention_head_dim=None, freq_shift=1,
                                  flip_sin_to_cos=False, center_input_sample=True,
                                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    "scale_shift_resnet_resample": dict(BASE, resnet_time_scale_shift="scale_shift", downsample_type="resnet",
                                        upsample_type="resnet",
                                        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
                                        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D")),
    "scale_shift_attn_groups": dict(BASE, resnet_time_scale_shift="scale_shift", attn_norm_num_groups=4),
    "attn_groups_default": dict(BASE, attn_norm_num_groups=16),
    "one_block": dict(BASE, block_out_channels=(32,), down_block_types=("AttnDownBlock2D",),
                      up_block_types=("AttnUpBlock2D",)),
    "resnet_blocks_mish_pad0": dict(BASE, act_fn="mish", downsample_padding=0, dropout=0.1, mid_block_scale_factor=2,
                                    down_block_types=("ResnetDownsampleBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "ResnetUpsampleBlock2D")),
    "uneven_heads_no_mid_attn": dict(BASE, block_out_channels=(24, 48), attention_head_dim=16, add_attention=False,
                                     time_embedding_dim=40),
    "no_mid_unetres_names": dict(BASE, mid_block_type=None, down_block_types=("UNetResDownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UNetResUpBlock2D"), act_fn="swish"),
    "learned_time": dict(BASE, time_embedding_type="learned", num_train_timesteps=50),
}
CLASS_CONFIGS = {
    "class_table": dict(BASE, num_class_embeds=10),
    "class_timestep": dict(BASE, class_embed_type="timestep"),
    "class_identity": dict(BASE, class_embed_type="identity"),
    "class_timestep_fourier": dict(BASE, class_embed_type="timestep", time_embedding_type="fourier"),
}


def build_pair(config: dict, seed: int = 0) -> tuple[torch.nn.Module, UNet2DModel]:
    """diffusers' model from ``seed`` and fusediff's holding the same weights, both in eval mode."""
    return parity.build_pair(UNet2DModel, config, seed)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity(name):
    theirs, ours = build_pair(CONFIGS[name])
    x = torch.randn(3, 3, 16, 16)  # odd batch
    t = torch.tensor([3, 17, 42]) if name == "learned_time" else torch.tensor([1, 500, 999])
    a, b = run_both(theirs, ours, x, t)
    assert_close(a, b, name)


@pytest.mark.parametrize("name", list(CLASS_CONFIGS))
def test_parity_class_conditioning(name):
    config = CLASS_CONFIGS[name]
    theirs, ours = build_pair(config)
    x = torch.randn(3, 3, 16, 16)
    fourier = config.get("time_embedding_type") == "fourier"
    t = torch.tensor([0.5, 2.0, 30.0]) if fourier else torch.tensor([10, 20, 30])
    if config.get("class_embed_type") == "identity":
        labels = torch.randn(3, 4 * config["block_out_channels"][0])
    elif fourier:
        labels = torch.tensor([1.0, 2.0, 3.0])
    else:
        labels = torch.tensor([0, 7, 9])
    a, b = run_both(theirs, ours, x, t, class_labels=labels)
    assert_close(a, b, name)


def test_parity_fourier():
    theirs, ours = build_pair(dict(BASE, time_embedding_type="fourier", flip_sin_to_cos=False))
    x = torch.randn(2, 3, 16, 16)
    a, b = run_both(theirs, ours, x, torch.tensor([0.01, 50.0]))  # sigmas: the output is divided by them
    assert_close(a, b, "fourier")


@pytest.fixture(scope="module")
def ddpm_pair():
    return build_pair(CONFIGS["ddpm"], seed=1)


@pytest.mark.parametrize("timestep", [7, torch.tensor(7), torch.tensor([7]), torch.tensor([7, 7, 7]),
                                      torch.tensor(7.0), torch.tensor([7], dtype=torch.int32)],
                         ids=["int", "0d", "len1", "batch", "0d_float", "int32"])
def test_timestep_forms(ddpm_pair, timestep):
    theirs, ours = ddpm_pair
    x = torch.randn(3, 3, 16, 16)
    a, b = run_both(theirs, ours, x, timestep)
    assert_close(a, b, f"timestep {timestep!r}")
    with torch.no_grad():
        assert torch.equal(a, ours(x, torch.full((3,), 7)).sample)  # one value is broadcast to the batch


def test_python_float_timestep_keeps_fraction(ddpm_pair):
    _, ours = ddpm_pair
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(ours(x, 7.5).sample, ours(x, torch.tensor([7.5])).sample)
        assert torch.equal(ours(x, 7.0).sample, ours(x, 7).sample)


def test_return_types(ddpm_pair):
    _, ours = ddpm_pair
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        out = ours(x, 3)
        tup = ours(x, 3, return_dict=False)
    assert isinstance(out, UNet2DOutput) and isinstance(tup, tuple) and len(tup) == 1
    assert torch.equal(out.sample, tup[0]) and torch.equal(out[0], out["sample"])
    assert out.sample.shape == (1, 3, 16, 16)


def test_seeded_init_matches_diffusers():
    for config in (CONFIGS["ddpm"], CONFIGS["scale_shift_resnet_resample"], CLASS_CONFIGS["class_timestep_fourier"]):
        assert_same_seeded_init(UNet2DModel, config)


@pytest.mark.parametrize("name", ["ddpm", "learned_time", "uneven_heads_no_mid_attn"])
def test_config_matches_diffusers(name):
    theirs, ours = build_pair(CONFIGS[name])
    assert plain_config(ours.config) == plain_config(theirs.config)
    assert plain_config(UNet2DModel.from_config(theirs.config).config) == plain_config(theirs.config)


def test_init_signature_matches_diffusers():
    def signature(cls):
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        return [(p.name, p.default, p.kind) for p in params]

    assert signature(UNet2DModel) == signature(diffusers.UNet2DModel)


def test_save_fusediff_load_diffusers(tmp_path):
    config = CLASS_CONFIGS["class_table"]
    _, ours = build_pair(dict(config, resnet_time_scale_shift="scale_shift"), seed=5)
    theirs = saved_and_loaded_by_diffusers(ours, tmp_path)
    x, labels = torch.randn(2, 3, 16, 16), torch.tensor([1, 4])
    a, b = run_both(theirs, ours, x, torch.tensor([5, 900]), class_labels=labels)
    assert_close(a, b, "fusediff save -> diffusers load")


def test_save_diffusers_load_fusediff(tmp_path):
    torch.manual_seed(6)
    theirs = diffusers.UNet2DModel(**CONFIGS["scale_shift_resnet_resample"]).eval()
    ours = saved_by_diffusers_and_loaded(theirs, tmp_path, UNet2DModel)
    x = torch.randn(2, 3, 16, 16)
    a, b = run_both(theirs, ours, x, 250)
    assert_close(a, b, "diffusers save -> fusediff load")
    ours.save_pretrained(tmp_path / "again")  # and back: our own round trip keeps config and weights
    again = UNet2DModel.from_pretrained(tmp_path / "again")
    assert plain_config(again.config) == plain_config(ours.config)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())


def test_legacy_attention_keys():
    theirs, ours = build_pair(CONFIGS["ddpm"])
    legacy = {}
    for k, v in theirs.state_dict().items():  # rename to the pre-0.14 names
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{old}.")
        legacy[k] = v
    assert any(".proj_attn." in k for k in legacy)
    converted = convert_legacy_attention_keys(legacy)
    assert set(converted) == set(theirs.state_dict())
    ours.load_state_dict(converted, strict=True)


def test_autograd_and_no_grad():
    _, ours = build_pair(CLASS_CONFIGS["class_timestep"])
    ours.train()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    out = ours(x, torch.tensor([3, 4]), class_labels=torch.tensor([1, 2])).sample
    out.square().mean().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.no_grad():
        y = ours(x, 3, class_labels=torch.tensor([1, 2])).sample
    assert not y.requires_grad


# -- validation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, match", [
    (dict(block_out_channels=(32, 64, 64)), "down_block_types has 2 entries"),
    (dict(up_block_types=("UpBlock2D",)), "up_block_types has 1 entries"),
    (dict(norm_num_groups=12), "norm_num_groups=12 must divide"),
    (dict(attn_norm_num_groups=5), "attn_norm_num_groups=5"),
    (dict(down_block_types=("SkipDownBlock2D", "AttnDownBlock2D")), "SkipDownBlock2D.*not supported"),
    (dict(up_block_types=("AttnUpBlock2D", "NoSuchBlock")), "NoSuchBlock.*not supported"),
    (dict(mid_block_type="UNetMidBlock2DCrossAttn"), "mid_block_type"),
    (dict(time_embedding_type="sinusoidal"), "time_embedding_type"),
    (dict(time_embedding_type="learned"), "num_train_timesteps"),
    (dict(class_embed_type="projection"), "class_embed_type"),
    (dict(resnet_time_scale_shift="spatial"), "resnet_time_scale_shift"),
    (dict(downsample_type="fir"), "downsample_type"),
    (dict(act_fn="tanh"), "act_fn"),
    (dict(attention_head_dim=128), "attention_head_dim=128"),
    (dict(block_out_channels=(32, 0)), "block_out_channels"),
    (dict(layers_per_block=0), "layers_per_block"),
    (dict(norm_num_groups=None), "norm_num_groups"),
])
def test_bad_config_raises(override, match):
    with pytest.raises(ValueError, match=match):
        UNet2DModel(**dict(BASE, **override))


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return UNet2DModel(**CLASS_CONFIGS["class_table"]).eval()


@pytest.mark.parametrize("sample, timestep, labels, error, match", [
    (torch.randn(2, 4, 16, 16), 1, [0, 1], ValueError, r"shape \(B, 3, H, W\)"),
    (torch.randn(3, 16, 16), 1, [0, 1], ValueError, r"shape \(B, 3, H, W\)"),
    (torch.randn(2, 3, 15, 16), 1, [0, 1], ValueError, "multiples of 2"),
    (torch.zeros(2, 3, 16, 16, dtype=torch.long), 1, [0, 1], TypeError, "floating"),
    (torch.randn(2, 3, 16, 16), torch.tensor([1, 2, 3]), [0, 1], ValueError, r"\(1,\) or \(2,\)"),
    (torch.randn(2, 3, 16, 16), torch.ones(2, 1), [0, 1], ValueError, "timestep must be"),
    (torch.randn(2, 3, 16, 16), True, [0, 1], TypeError, "bool"),
    (torch.randn(2, 3, 16, 16), "5", [0, 1], TypeError, "timestep"),
    (torch.randn(2, 3, 16, 16), 1, None, ValueError, "class-conditional"),
    (torch.randn(2, 3, 16, 16), 1, [0, 10], ValueError, r"\[0, 10\)"),
    (torch.randn(2, 3, 16, 16), 1, [0, 1, 2], ValueError, "class_labels must be"),
])
def test_bad_input_raises(small, sample, timestep, labels, error, match):
    labels = torch.tensor(labels) if labels is not None else None
    with pytest.raises(error, match=match):
        small(sample, timestep, class_labels=labels)


def test_class_labels_without_class_embedding_raise(ddpm_pair):
    with pytest.raises(ValueError, match="no class embedding"):
        ddpm_pair[1](torch.randn(1, 3, 16, 16), 1, class_labels=torch.tensor([0]))


def test_learned_timestep_out_of_range_raises():
    model = UNet2DModel(**CONFIGS["learned_time"])
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        model(torch.randn(1, 3, 16, 16), 50)
    with pytest.raises(TypeError, match="integer"):
        model(torch.randn(1, 3, 16, 16), torch.tensor([3.0]))


def test_legacy_attention_names_load_through_from_pretrained(tmp_path):
    """A checkpoint with the old query/key/value/proj_attn names loads, renamed, with the same outputs."""
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4)
    legacy = save_with_legacy_attention_names(model, tmp_path)
    assert any(".query." in k for k in legacy)
    loaded = UNet2DModel.from_pretrained(tmp_path)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, 3).sample, model(x, 3).sample)
