"""VQModel and its VectorQuantizer against diffusers 0.42.1: same config, names, codes, losses, images, checkpoints.

Parity tests build diffusers' model from a seed, spread its codebook out (randn instead of the
tiny uniform init, so that the nearest code is never a near-tie that a 1e-7 difference in the
encoder could flip), copy the weights into fusediff's strictly and compare in fp32 relative to
the reference's largest magnitude, printing the maximum difference. Quantisation of identical
latents must pick identical codes.
"""

from __future__ import annotations

import inspect

import diffusers
import pytest
import torch
from diffusers.models.autoencoders.vae import VectorQuantizer as TheirQuantizer

from fusediff.models import VQModel
from fusediff.models.vae import DecoderOutput
from fusediff.models.vq_model import VectorQuantizer, VQEncoderOutput
from support.parity import (assert_close, assert_same_seeded_init, plain_config, run_both,  # fp32, RTOL 1e-5
                            saved_and_loaded_by_diffusers, saved_by_diffusers_and_loaded)

BASE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, num_vq_embeddings=32)
CONFIGS = {
    "ldm_like": BASE,
    "embed_dim_differs_three_levels": dict(BASE, block_out_channels=(16, 32, 32), layers_per_block=2,
                                           down_block_types=("DownEncoderBlock2D",) * 3,
                                           up_block_types=("UpDecoderBlock2D",) * 3, vq_embed_dim=5,
                                           latent_channels=4),
    "no_mid_attention": dict(BASE, mid_block_add_attention=False, in_channels=1, out_channels=1),
}


def build_pair(config: dict, seed: int = 0) -> tuple[torch.nn.Module, VQModel]:
    """diffusers' model from ``seed`` (codebook spread to N(0, 1)) and fusediff's with the same weights."""
    torch.manual_seed(seed)
    theirs = diffusers.VQModel(**config).eval()
    with torch.no_grad():
        theirs.quantize.embedding.weight.normal_()
    ours = VQModel(**config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity(name):
    config = CONFIGS[name]
    theirs, ours = build_pair(config)
    x = torch.randn(3, config.get("in_channels", 3), 16, 24)
    with torch.no_grad():
        h_o, h_t = ours.encode(x).latents, theirs.encode(x).latents
        assert_close(h_o, h_t, f"{name} encode")
        codes_o, codes_t = ours.quantize(h_o)[2][2], theirs.quantize(h_t)[2][2]
        assert torch.equal(codes_o, codes_t), f"{name}: {(codes_o != codes_t).sum()} codes differ"
        assert codes_t.unique().numel() > 1
        dec_o, dec_t = ours.decode(h_t), theirs.decode(h_t)
        assert_close(dec_o.sample, dec_t.sample, f"{name} decode")
        assert_close(dec_o.commit_loss, dec_t.commit_loss, f"{name} commit loss")
        raw_o, raw_t = ours.decode(h_t, force_not_quantize=True), theirs.decode(h_t, force_not_quantize=True)
        assert_close(raw_o.sample, raw_t.sample, f"{name} decode, not quantised")
        assert torch.equal(raw_o.commit_loss, torch.zeros(3))
        assert (raw_o.sample - dec_o.sample).abs().max() > 1e-3
        fwd_o, fwd_t = ours(x), theirs(x)
        assert_close(fwd_o.sample, fwd_t.sample, f"{name} forward")
        assert_close(fwd_o.commit_loss, fwd_t.commit_loss, f"{name} forward commit loss")
    f = 2 ** (len(config["block_out_channels"]) - 1)
    assert h_o.shape == (3, config.get("vq_embed_dim") or config.get("latent_channels", 3), 16 // f, 24 // f)


def test_lookup_from_codebook():
    config = dict(BASE, lookup_from_codebook=True)
    theirs, ours = build_pair(config)
    indices = torch.randint(0, 32, (2, 4, 6))  # (B, h, w) codes
    shape = (2, 4, 6, 3)  # (B, h, w, D)
    for codes in (indices, indices.reshape(-1)):  # batched or flat codes
        with torch.no_grad():
            dec_o = ours.decode(codes, force_not_quantize=True, shape=shape)
            dec_t = theirs.decode(codes, force_not_quantize=True, shape=shape)
        assert_close(dec_o.sample, dec_t.sample, f"decode from codebook indices {tuple(codes.shape)}")
        assert dec_o.commit_loss.shape == dec_t.commit_loss.shape  # zeros, one per leading index entry
    assert dec_o.sample.shape == (2, 3, 8, 12)
    entries = ours.quantize.get_codebook_entry(indices, shape)
    assert torch.equal(entries, theirs.quantize.get_codebook_entry(indices, shape))
    assert torch.equal(entries[1, :, 2, 3], ours.quantize.embedding.weight[indices[1, 2, 3]])
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        ours.decode(torch.tensor([0, 32]), force_not_quantize=True, shape=(1, 1, 2, 3))
    with pytest.raises(TypeError, match="integer"):
        ours.quantize.get_codebook_entry(torch.zeros(4), (1, 2, 2, 3))


def test_return_types():
    _, ours = build_pair(BASE)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        enc, enc_t = ours.encode(x), ours.encode(x, return_dict=False)
        dec, dec_t = ours.decode(enc.latents), ours.decode(enc.latents, return_dict=False)
        out, out_t = ours(x), ours(x, return_dict=False)
    assert isinstance(enc, VQEncoderOutput) and len(enc_t) == 1 and torch.equal(enc_t[0], enc.latents)
    assert isinstance(dec, DecoderOutput) and len(dec_t) == 2 and torch.equal(dec_t[0], dec.sample)
    assert isinstance(out, DecoderOutput) and len(out_t) == 2 and torch.equal(out_t[1], out.commit_loss)
    assert out.commit_loss.dim() == 0


@pytest.mark.parametrize("legacy", [True, False])
def test_quantizer_matches_diffusers_with_gradients(legacy):
    torch.manual_seed(0)
    theirs = TheirQuantizer(16, 4, beta=0.25, legacy=legacy, sane_index_shape=True)
    ours = VectorQuantizer(16, 4, beta=0.25, legacy=legacy, sane_index_shape=True)
    with torch.no_grad():
        theirs.embedding.weight.normal_()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    z = torch.randn(2, 4, 3, 5)
    outs = []
    for q in (ours, theirs):
        zz = z.clone().requires_grad_(True)
        z_q, loss, (_, _, idx) = q(zz)
        (loss + 0.1 * z_q.square().sum()).backward()
        outs.append((z_q, loss, idx, zz.grad, q.embedding.weight.grad))
    (zq_o, loss_o, idx_o, gz_o, ge_o), (zq_t, loss_t, idx_t, gz_t, ge_t) = outs
    assert torch.equal(idx_o, idx_t) and idx_o.shape == (2, 3, 5)
    for a, b, what in ((zq_o, zq_t, "z_q"), (loss_o, loss_t, "loss"), (gz_o, gz_t, "dL/dz"),
                       (ge_o, ge_t, "dL/dcodebook")):
        assert_close(a, b, f"legacy={legacy} {what}")
    # the chosen codes are the nearest ones, and z_q holds them
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    nearest = ((flat[:, None, :] - ours.embedding.weight[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(idx_o.reshape(-1), nearest)
    assert torch.allclose(zq_o.permute(0, 2, 3, 1).reshape(-1, 4), ours.embedding.weight[nearest], atol=1e-6)


def test_quantizer_flat_indices_and_loss_weighting():
    q = VectorQuantizer(8, 3, beta=0.25)
    z = torch.randn(2, 3, 4, 4)
    z_q, loss, (perplexity, encodings, idx) = q(z)
    assert perplexity is None and encodings is None and idx.shape == (32,) and idx.dtype == torch.int64
    assert torch.allclose(loss, 1.25 * ((z_q - z) ** 2).mean())  # value: (1 + beta) ||z - z_q||^2


def test_seeded_init_matches_diffusers():
    assert_same_seeded_init(VQModel, CONFIGS["embed_dim_differs_three_levels"])


def test_config_and_signatures_match_diffusers():
    def params(fn):
        return [(p.name, p.default, p.kind) for p in list(inspect.signature(fn).parameters.values())[1:]]

    for method in ("__init__", "encode", "decode", "forward"):
        assert params(getattr(VQModel, method)) == params(getattr(diffusers.VQModel, method)), method
    assert params(VectorQuantizer.__init__) == params(TheirQuantizer.__init__)
    theirs, ours = build_pair(dict(BASE, scaling_factor=0.5, force_upcast=True))
    assert plain_config(ours.config) == plain_config(theirs.config)


def test_save_fusediff_load_diffusers(tmp_path):
    _, ours = build_pair(CONFIGS["embed_dim_differs_three_levels"], seed=4)
    theirs = saved_and_loaded_by_diffusers(ours, tmp_path)
    assert_close(*run_both(theirs, ours, torch.randn(2, 3, 16, 16)), "fusediff save -> diffusers load")


def test_save_diffusers_load_fusediff(tmp_path):
    theirs, _ = build_pair(CONFIGS["no_mid_attention"], seed=5)
    ours = saved_by_diffusers_and_loaded(theirs, tmp_path, VQModel)
    assert_close(*run_both(theirs, ours, torch.randn(2, 1, 16, 16)), "diffusers save -> fusediff load")


def test_straight_through_gradients_reach_the_encoder():
    _, ours = build_pair(BASE)
    ours.train()
    out = ours(torch.randn(2, 3, 16, 16))
    (out.sample.square().mean() + out.commit_loss).backward()
    missing = [n for n, p in ours.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert ours.encoder.conv_in.weight.grad.abs().sum() > 0


# -- validation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, error, match", [
    (dict(norm_type="spatial"), NotImplementedError, "spatial"),
    (dict(norm_type="layer"), ValueError, "norm_type"),
    (dict(num_vq_embeddings=0), ValueError, "num_vq_embeddings"),
    (dict(vq_embed_dim=0), ValueError, "vq_embed_dim"),
    (dict(up_block_types=("UpDecoderBlock2D",)), ValueError, "up_block_types must list one block type"),
    (dict(norm_num_groups=5), ValueError, "norm_num_groups=5"),
])
def test_bad_config_raises(override, error, match):
    with pytest.raises(error, match=match):
        VQModel(**dict(BASE, **override))


def test_remap_is_refused():
    with pytest.raises(NotImplementedError, match="remap"):
        VectorQuantizer(8, 3, beta=0.25, remap="used_codes.npy")


@pytest.mark.parametrize("method, tensor, error, match", [
    ("encode", torch.randn(1, 4, 16, 16), ValueError, r"shape \(B, 3, H, W\)"),
    ("encode", torch.randn(1, 3, 1, 16), ValueError, "at least 2"),
    ("decode", torch.randn(1, 4, 4, 4), ValueError, r"shape \(B, 3, H, W\)"),
    ("decode", torch.randint(0, 3, (1, 3, 4, 4)), TypeError, "floating"),
    ("forward", torch.randn(2, 16, 16), ValueError, r"shape \(B, 3, H, W\)"),
])
def test_bad_input_raises(method, tensor, error, match):
    model = VQModel(**BASE)
    with pytest.raises(error, match=match):
        getattr(model, method)(tensor)
