"""PriorTransformer, UnCLIPTextProjModel and the UNet's attention mask against diffusers: same weights -> same outputs."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel as TheirTextProj

from fusediff import PriorTransformer, UNet2DConditionModel, UnCLIPTextProjModel

ATOL = 1e-5
PRIORS = {
    "default": {},
    "norms-dims": dict(norm_in_type="layer", embedding_proj_norm_type="layer", time_embed_dim=20,
                       embedding_proj_dim=16, clip_embed_dim=24),
}


def perturbed_pair(theirs_cls, ours_cls, **config):
    torch.manual_seed(0)
    theirs = theirs_cls(**config).eval()
    torch.manual_seed(0)
    ours = ours_cls(**config).eval()
    assert list(theirs.state_dict()) == list(ours.state_dict())
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


@pytest.mark.parametrize("name", PRIORS)
@pytest.mark.parametrize("masked", [False, True])
def test_prior_matches_diffusers(name, masked, tmp_path) -> None:
    config = dict(num_attention_heads=2, attention_head_dim=12, embedding_dim=32, num_layers=2, num_embeddings=7,
                  **PRIORS[name])
    theirs, ours = perturbed_pair(diffusers.PriorTransformer, PriorTransformer, **config)
    g = torch.Generator().manual_seed(1)
    x, enc = torch.randn(3, 32, generator=g), torch.randn(3, 7, 32, generator=g)
    proj = torch.randn(3, config.get("embedding_proj_dim", 32), generator=g)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 3:] = False
    args = (x, torch.tensor(5), proj, enc, mask if masked else None)
    with torch.no_grad():
        a, b = theirs(*args).predicted_image_embedding, ours(*args).predicted_image_embedding
        diff = (a - b).abs().max().item()
        assert diff < ATOL, f"max |diff| {diff:.3g}"
        ours.save_pretrained(tmp_path / "ours")
        back = diffusers.PriorTransformer.from_pretrained(tmp_path / "ours").eval()
        assert (back(*args).predicted_image_embedding - a).abs().max() < ATOL
        theirs.save_pretrained(tmp_path / "theirs")
        mine = PriorTransformer.from_pretrained(tmp_path / "theirs").eval()
        assert torch.equal(mine(*args).predicted_image_embedding, b)
        assert torch.equal(ours.post_process_latents(a), theirs.post_process_latents(a))


def test_prior_bad_input() -> None:
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=4, embedding_dim=8, num_layers=1,
                             num_embeddings=5)
    x, proj, enc = torch.zeros(2, 8), torch.zeros(2, 8), torch.zeros(2, 5, 8)
    with pytest.raises(ValueError, match="hidden_states"):
        prior(torch.zeros(2, 7), 1, proj, enc)
    with pytest.raises(ValueError, match="encoder_hidden_states is required"):
        prior(x, 1, proj)
    with pytest.raises(ValueError, match="attention_mask"):
        prior(x, 1, proj, enc, torch.ones(2, 4))
    with pytest.raises(ValueError, match="norm_in_type"):
        PriorTransformer(norm_in_type="rms")


def test_text_proj_matches_diffusers() -> None:
    config = dict(clip_embeddings_dim=32, time_embed_dim=128, cross_attention_dim=100)
    theirs, ours = perturbed_pair(TheirTextProj, UnCLIPTextProjModel, **config)
    args = dict(image_embeddings=torch.randn(2, 32), prompt_embeds=torch.randn(4, 32),
                text_encoder_hidden_states=torch.randn(4, 7, 32), do_classifier_free_guidance=True)
    with torch.no_grad():
        for a, b in zip(theirs(**args), ours(**args)):
            assert (a - b).abs().max() < ATOL
    with pytest.raises(ValueError, match="as many"):
        ours(**{**args, "do_classifier_free_guidance": False})


def test_unet_attention_mask_matches_diffusers() -> None:
    config = dict(sample_size=16, in_channels=3, out_channels=6,
                  down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                  up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                  mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
                  cross_attention_dim=24, attention_head_dim=8, resnet_time_scale_shift="scale_shift",
                  class_embed_type="identity")
    theirs, ours = perturbed_pair(diffusers.UNet2DConditionModel, UNet2DConditionModel, **config)
    g = torch.Generator().manual_seed(2)
    x, ctx, labels = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 9, 24, generator=g), torch.randn(2, 128)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 4:] = False
    with torch.no_grad():
        a = theirs(x, 10, encoder_hidden_states=ctx, class_labels=labels, attention_mask=mask).sample
        b = ours(x, 10, encoder_hidden_states=ctx, class_labels=labels, attention_mask=mask).sample
        unmasked = ours(x, 10, encoder_hidden_states=ctx, class_labels=labels).sample
    assert (a - b).abs().max() < ATOL, (a - b).abs().max()
    assert (unmasked - b).abs().max() > 1e-3  # the mask changes the output
    with pytest.raises(ValueError, match="attention_mask"):
        ours(x, 10, encoder_hidden_states=ctx, class_labels=labels, attention_mask=mask[:, :5])
