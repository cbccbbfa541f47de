"""AutoencoderKL against diffusers 0.42.1: same config, parameter names, posterior, samples, tiles and checkpoints.

Each parity test builds diffusers' model from a seed, copies its weights into fusediff's with
``strict=True`` and compares in fp32, relative to the reference's largest magnitude; the
maximum difference is printed. Models are tiny (<= 64 channels, 16-40 px) to stay fast on CPU;
tiling uses ``sample_size=16`` so that diffusers and fusediff both pick 16 px / 16/f latent
tiles from the config and a 40x24 image spans several partial tiles.
"""

from __future__ import annotations

import inspect

import diffusers
import pytest
import torch

from fusediff.models import AutoencoderKL
from fusediff.models.autoencoder_kl import AutoencoderKLOutput
from fusediff.models.vae import DecoderOutput, DiagonalGaussianDistribution
from support import parity
from support.parity import (assert_close, assert_same_seeded_init, plain_config, run_both,
                            save_with_legacy_attention_names, saved_and_loaded_by_diffusers,
                            saved_by_diffusers_and_loaded)
from support.spy import record_calls

BASE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4, sample_size=16)
THREE = dict(BASE, block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
             up_block_types=("UpDecoderBlock2D",) * 3)

CONFIGS = {
    "sd_like_two_levels": BASE,
    "three_levels_two_layers": dict(THREE, layers_per_block=2),
    "no_quant_convs": dict(BASE, use_quant_conv=False, use_post_quant_conv=False),
    "no_mid_attention_three_levels": dict(THREE, mid_block_add_attention=False),
    "one_level_mish_gray_in": dict(BASE, block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                                   up_block_types=("UpDecoderBlock2D",), in_channels=1, out_channels=2,
                                   act_fn="mish", latent_channels=3),
}


def build_pair(config: dict, seed: int = 0) -> tuple[torch.nn.Module, AutoencoderKL]:
    """diffusers' model from ``seed`` and fusediff's holding the same weights, both in eval mode."""
    return parity.build_pair(AutoencoderKL, config, seed)


def assert_same_posterior(ours: DiagonalGaussianDistribution, theirs, what: str) -> None:
    assert isinstance(ours, DiagonalGaussianDistribution)
    for field in ("mean", "logvar", "std", "var"):
        assert_close(getattr(ours, field), getattr(theirs, field), f"{what} {field}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity(name):
    config = CONFIGS[name]
    theirs, ours = build_pair(config)
    x = torch.randn(3, config.get("in_channels", 3), 16, 24)  # odd batch, not square
    with torch.no_grad():
        post_o, post_t = ours.encode(x).latent_dist, theirs.encode(x).latent_dist
        assert_same_posterior(post_o, post_t, f"{name} encode")
        z_o = post_o.sample(generator=torch.Generator().manual_seed(7))
        z_t = post_t.sample(generator=torch.Generator().manual_seed(7))
        assert_close(z_o, z_t, f"{name} posterior sample")
        assert not torch.equal(z_o, post_o.mode())
        assert_close(post_o.kl(), post_t.kl(), f"{name} kl")
        other_o, other_t = ours.encode(x.flip(0)).latent_dist, theirs.encode(x.flip(0)).latent_dist
        assert_close(post_o.kl(other_o), post_t.kl(other_t), f"{name} kl to another posterior")
        assert_close(post_o.nll(z_o), post_t.nll(z_t), f"{name} nll")
        assert_close(ours.decode(z_t).sample, theirs.decode(z_t).sample, f"{name} decode")
        assert_close(ours(x).sample, theirs(x).sample, f"{name} forward (mode)")
        fo = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample
        ft = theirs(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample
        assert_close(fo, ft, f"{name} forward (sampled)")
    latent_hw = tuple(s // 2 ** (len(config["block_out_channels"]) - 1) for s in (16, 24))
    assert post_o.mean.shape == (3, config["latent_channels"], *latent_hw)


def test_sample_with_one_generator_per_element():
    theirs, ours = build_pair(BASE)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        z_o = ours.encode(x).latent_dist.sample([torch.Generator().manual_seed(s) for s in (1, 2)])
        z_t = theirs.encode(x).latent_dist.sample([torch.Generator().manual_seed(s) for s in (1, 2)])
    assert_close(z_o, z_t, "per-element generators")


def test_seeded_init_matches_diffusers():
    for config in (CONFIGS["three_levels_two_layers"], CONFIGS["no_quant_convs"]):
        assert_same_seeded_init(AutoencoderKL, config)


def test_config_and_signatures_match_diffusers():
    def params(fn):
        return [(p.name, p.default, p.kind) for p in list(inspect.signature(fn).parameters.values())[1:]]

    for method in ("__init__", "encode", "decode", "forward", "tiled_decode"):
        assert params(getattr(AutoencoderKL, method)) == params(getattr(diffusers.AutoencoderKL, method)), method
    config = dict(BASE, scaling_factor=0.13025, shift_factor=0.0609, latents_mean=(0.1, 0.2, 0.3, 0.4),
                  latents_std=(1.0, 2.0, 3.0, 4.0), force_upcast=False)
    theirs, ours = build_pair(config)
    assert plain_config(ours.config) == plain_config(theirs.config)
    assert plain_config(AutoencoderKL.from_config(theirs.config).config) == plain_config(theirs.config)


def test_return_types():
    _, ours = build_pair(BASE)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        enc, enc_t = ours.encode(x), ours.encode(x, return_dict=False)
        dec, dec_t = ours.decode(enc.latent_dist.mode()), ours.decode(enc.latent_dist.mode(), return_dict=False)
        out, out_t = ours(x), ours(x, return_dict=False)
    assert isinstance(enc, AutoencoderKLOutput) and isinstance(enc_t, tuple) and len(enc_t) == 1
    assert torch.equal(enc_t[0].mean, enc.latent_dist.mean)
    assert isinstance(dec, DecoderOutput) and dec.commit_loss is None and len(dec_t) == 1
    assert torch.equal(dec.sample, dec_t[0]) and torch.equal(out.sample, out_t[0])
    assert torch.equal(out[0], out["sample"])
    assert out.sample.shape == (1, 3, 16, 16)


# -- slicing and tiling ------------------------------------------------------------------------------

def test_slicing_equals_unsliced(monkeypatch):
    theirs, ours = build_pair(CONFIGS["three_levels_two_layers"])
    x, z = torch.randn(3, 3, 16, 16), torch.randn(3, 4, 4, 4)
    with torch.no_grad():
        mean, dec = ours.encode(x).latent_dist.mean, ours.decode(z).sample
        ours.enable_slicing()
        theirs.enable_slicing()
        encoded = record_calls(monkeypatch, ours.encoder, "forward")
        decoded = record_calls(monkeypatch, ours.decoder, "forward")
        assert_close(ours.encode(x).latent_dist.mean, mean, "sliced encode vs whole batch")
        assert_close(ours.decode(z).sample, dec, "sliced decode vs whole batch")
        assert_close(ours.decode(z).sample, theirs.decode(z).sample, "sliced decode vs diffusers")
    assert [args[0].shape[0] for args in encoded] == [1, 1, 1]  # one batch element at a time
    assert [args[0].shape[0] for args in decoded] == [1] * 6
    ours.disable_slicing()
    assert not ours.use_slicing


@pytest.mark.parametrize("name", ["sd_like_two_levels", "three_levels_two_layers"])
def test_tiling_matches_diffusers(name):
    theirs, ours = build_pair(CONFIGS[name])
    assert (ours.tile_sample_min_size, ours.tile_latent_min_size, ours.tile_overlap_factor) == \
        (theirs.tile_sample_min_size, theirs.tile_latent_min_size, theirs.tile_overlap_factor)
    x = torch.randn(2, 3, 40, 24)  # 4 x 2 tiles of 16 px every 12 px, the last ones partial
    f = 2 ** (len(CONFIGS[name]["block_out_channels"]) - 1)
    z = torch.randn(2, 4, 40 // f, 24 // f)
    with torch.no_grad():
        whole = ours.encode(x).latent_dist.mean
        whole_dec = ours.decode(z).sample
        ours.enable_tiling()
        theirs.enable_tiling()
        post_o = ours.encode(x).latent_dist
        assert_same_posterior(post_o, theirs.encode(x).latent_dist, f"{name} tiled encode")
        dec = ours.decode(z).sample
        assert_close(dec, theirs.decode(z).sample, f"{name} tiled decode")
        assert_close(ours(x).sample, theirs(x).sample, f"{name} tiled forward")
        ours.enable_slicing()
        theirs.enable_slicing()
        assert_close(ours.decode(z).sample, theirs.decode(z).sample, f"{name} tiled + sliced decode")
    assert post_o.mean.shape == whole.shape and dec.shape == whole_dec.shape == (2, 3, 40, 24)
    assert (post_o.mean - whole).abs().max() > 1e-3  # the tiles really were encoded separately
    assert (dec - whole_dec).abs().max() > 1e-3


def test_tiled_blending_is_exact():
    """With the very same encoder and decoder modules, fusediff's tiling gives diffusers' result bit for bit."""
    theirs, ours = build_pair(BASE)
    theirs.encoder, theirs.quant_conv = ours.encoder, ours.quant_conv
    theirs.decoder, theirs.post_quant_conv = ours.decoder, ours.post_quant_conv
    ours.enable_tiling()
    theirs.enable_tiling()
    x, z = torch.randn(1, 3, 40, 24), torch.randn(1, 4, 20, 12)
    with torch.no_grad():
        assert torch.equal(ours.encode(x).latent_dist.mean, theirs.encode(x).latent_dist.mean)
        assert torch.equal(ours.decode(z).sample, theirs.decode(z).sample)
        assert torch.equal(ours.tiled_encode(x[:, :, :16, :16]).latent_dist.mean,
                           theirs.tiled_encode(x[:, :, :16, :16]).latent_dist.mean)
        assert torch.equal(ours.tiled_decode(z[:, :, :8, :8]).sample, theirs.tiled_decode(z[:, :, :8, :8]).sample)


def test_tiling_leaves_small_inputs_whole():
    _, ours = build_pair(BASE)
    x, z = torch.randn(1, 3, 16, 16), torch.randn(1, 4, 8, 8)  # exactly one tile
    with torch.no_grad():
        mean, dec = ours.encode(x).latent_dist.mean, ours.decode(z).sample
        ours.enable_tiling()
        assert torch.equal(ours.encode(x).latent_dist.mean, mean) and torch.equal(ours.decode(z).sample, dec)


def test_enable_tiling_with_sizes():
    _, ours = build_pair(THREE)
    ours.enable_tiling(tile_sample_min_size=24, tile_overlap_factor=0.5)
    assert (ours.tile_sample_min_size, ours.tile_latent_min_size, ours.tile_overlap_factor) == (24, 6, 0.5)
    with torch.no_grad():
        out = ours.decode(torch.randn(1, 4, 10, 7)).sample
    assert out.shape == (1, 3, 40, 28) and torch.isfinite(out).all()
    ours.disable_tiling()
    assert not ours.use_tiling


@pytest.mark.parametrize("kwargs, match", [
    (dict(tile_overlap_factor=1.0), "tile_overlap_factor"),
    (dict(tile_overlap_factor=-0.1), "tile_overlap_factor"),
    (dict(tile_sample_min_size=1), "tile_sample_min_size=1"),
    (dict(tile_sample_min_size=3), "tile_latent_min_size=1"),  # 3 / 2 -> 1 latent, which cannot advance
    (dict(tile_sample_min_size=16.0), "tile_sample_min_size must be an int"),
])
def test_bad_tile_settings_raise(kwargs, match):
    _, ours = build_pair(BASE)
    with pytest.raises(ValueError, match=match):
        ours.enable_tiling(**kwargs)
    assert not ours.use_tiling


def test_bad_tile_attribute_raises_at_use():
    _, ours = build_pair(BASE)
    ours.enable_tiling()
    ours.tile_latent_min_size = 0  # set directly, as diffusers users do
    with pytest.raises(ValueError, match="tile_latent_min_size=0"):
        ours.decode(torch.randn(1, 4, 12, 12))


# -- checkpoints --------------------------------------------------------------------------------------

def test_save_fusediff_load_diffusers(tmp_path):
    config = dict(CONFIGS["no_quant_convs"], scaling_factor=0.3611, shift_factor=0.1159, force_upcast=False)
    _, ours = build_pair(config, seed=5)
    theirs = saved_and_loaded_by_diffusers(ours, tmp_path)
    assert_close(*run_both(theirs, ours, torch.randn(2, 3, 16, 16)), "fusediff save -> diffusers load")


def test_save_diffusers_load_fusediff(tmp_path):
    torch.manual_seed(6)
    theirs = diffusers.AutoencoderKL(**dict(THREE, latents_mean=(0.0, 1.0, 2.0, 3.0),
                                            latents_std=(1.0, 1.0, 2.0, 2.0))).eval()
    ours = saved_by_diffusers_and_loaded(theirs, tmp_path, AutoencoderKL)
    assert_close(*run_both(theirs, ours, torch.randn(2, 3, 16, 16)), "diffusers save -> fusediff load")


def test_legacy_attention_names_load(tmp_path):
    _, ours = build_pair(BASE)
    legacy = save_with_legacy_attention_names(ours, tmp_path)
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    loaded = AutoencoderKL.from_pretrained(tmp_path)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x).sample, ours(x).sample)


def test_autograd_through_sampled_forward():
    _, ours = build_pair(BASE)
    ours.train()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    posterior = ours.encode(x).latent_dist
    recon = ours.decode(posterior.sample(torch.Generator().manual_seed(0))).sample
    (recon.square().mean() + 1e-3 * posterior.kl().mean()).backward()
    missing = [n for n, p in ours.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == [] and x.grad is not None and x.grad.abs().sum() > 0


# -- distribution and validation ----------------------------------------------------------------------

def test_deterministic_distribution():
    params = torch.randn(2, 8, 3, 3)
    dist = DiagonalGaussianDistribution(params, deterministic=True)
    assert torch.equal(dist.sample(torch.Generator().manual_seed(0)), dist.mean)
    assert dist.kl().abs().sum() == 0 and dist.nll(dist.mean).abs().sum() == 0
    wide = DiagonalGaussianDistribution(torch.cat([params[:, :4], torch.full((2, 4, 3, 3), 100.0)], dim=1))
    assert wide.logvar.max() == 20.0  # clamped as in the LDM code


@pytest.mark.parametrize("parameters", [torch.randn(2, 7, 3, 3), torch.randn(6), "moments"])
def test_bad_distribution_parameters_raise(parameters):
    with pytest.raises(ValueError, match="mean and log-variance"):
        DiagonalGaussianDistribution(parameters)


@pytest.mark.parametrize("override, match", [
    (dict(down_block_types=("DownEncoderBlock2D",)), "down_block_types must list one block type per entry"),
    (dict(up_block_types=("UpDecoderBlock2D", "AttnUpDecoderBlock2D")), "AttnUpDecoderBlock2D.*not supported"),
    (dict(down_block_types=("DownBlock2D", "DownEncoderBlock2D")), "DownBlock2D.*not supported"),
    (dict(norm_num_groups=12), "norm_num_groups=12 must divide"),
    (dict(act_fn="tanh"), "act_fn"),
    (dict(latent_channels=0), "latent_channels must be a positive int"),
    (dict(block_out_channels=(32, 0)), "block_out_channels"),
    (dict(layers_per_block=0), "layers_per_block"),
    (dict(sample_size=0), "sample_size"),
    (dict(latents_mean=(0.0, 1.0)), "latents_mean must be None or a list of latent_channels=4"),
    (dict(scaling_factor="0.18"), "scaling_factor"),
])
def test_bad_config_raises(override, match):
    with pytest.raises(ValueError, match=match):
        AutoencoderKL(**dict(BASE, **override))


@pytest.mark.parametrize("method, tensor, error, match", [
    ("encode", torch.randn(1, 4, 16, 16), ValueError, r"shape \(B, 3, H, W\)"),
    ("encode", torch.randn(3, 16, 16), ValueError, r"shape \(B, 3, H, W\)"),
    ("encode", torch.randn(0, 3, 16, 16), ValueError, "empty batch"),
    ("encode", torch.randn(1, 3, 3, 16), ValueError, "at least 4"),  # three levels halve twice
    ("encode", torch.zeros(1, 3, 16, 16, dtype=torch.long), TypeError, "floating"),
    ("decode", torch.randn(1, 3, 4, 4), ValueError, r"shape \(B, 4, H, W\)"),
    ("forward", torch.randn(1, 1, 16, 16), ValueError, r"shape \(B, 3, H, W\)"),
    ("tiled_decode", torch.randn(1, 8, 8, 8), ValueError, r"shape \(B, 4, H, W\)"),
])
def test_bad_input_raises(method, tensor, error, match):
    model = AutoencoderKL(**THREE)
    with pytest.raises(error, match=match):
        getattr(model, method)(tensor)
