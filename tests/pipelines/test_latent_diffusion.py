"""LDMTextToImagePipeline and LDMBertModel against HF diffusers: a diffusers LDM directory (VQModel, LDMBert,
BertTokenizer) gives diffusers' images; LDMBert loads and saves transformers' files without transformers."""

from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
import torch
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel as TheirBert
from pipelines.tiny_sd import LDM_BERT, SIZE, assert_same_images, build_ldm

import fusediff
from fusediff import DiffusionPipeline, LDMBertModel, LDMTextToImagePipeline

CALL = dict(prompt=["a red cat", "a dog"], num_inference_steps=3, output_type="np")


@pytest.fixture(scope="module")
def ldm(tmp_path_factory):
    """name -> (directory, diffusers pipeline, fusediff pipeline)."""
    root, built = tmp_path_factory.mktemp("ldm"), {}

    def get(name: str = "ddim"):
        if name not in built:
            theirs = build_ldm(root / name, name)
            ours = DiffusionPipeline.from_pretrained(root / name)
            ours.set_progress_bar_config(disable=True)
            built[name] = root / name, theirs, ours
        return built[name]
    return get


@pytest.mark.parametrize("name, guidance", [("ddim", 1.0), ("ddim", 4.0), ("pndm", 4.0)])
def test_diffusers_directory_gives_diffusers_images(ldm, name, guidance):
    _, theirs, ours = ldm(name)
    assert type(ours) is LDMTextToImagePipeline
    assert type(ours.bert) is LDMBertModel and type(ours.vqvae) is fusediff.VQModel
    call = dict(CALL, guidance_scale=guidance)
    gens = lambda: [torch.Generator().manual_seed(i) for i in (4, 5)]  # noqa: E731
    assert_same_images(ours(generator=gens(), **call).images, theirs(generator=gens(), **call).images)
    one = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    assert_same_images(ours(generator=one(), **call).images, theirs(generator=one(), **call).images)


def test_eta_noise(ldm):
    """diffusers passes no generator to DDIM's step, so with eta > 0 both draw the step noise from the global
    RNG when no generator is given; given one, fusediff draws it from that generator (reproducible)."""
    _, theirs, ours = ldm("ddim")
    call = dict(CALL, eta=0.8, guidance_scale=3.0)
    torch.manual_seed(11)
    ours_global = ours(**call).images
    torch.manual_seed(11)
    assert_same_images(ours_global, theirs(**call).images)
    torch.manual_seed(0)
    first = ours(generator=torch.Generator().manual_seed(2), **call).images
    torch.manual_seed(1)
    np.testing.assert_array_equal(first, ours(generator=torch.Generator().manual_seed(2), **call).images)


def test_fusediff_directory_loads_in_diffusers(ldm, tmp_path):
    _, _, ours = ldm("ddim")
    ours.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["bert"] == ["latent_diffusion", "LDMBertModel"] and index["vqvae"] == ["diffusers", "VQModel"]
    assert sorted(p.name for p in (tmp_path / "bert").iterdir()) == ["config.json", "model.safetensors"]
    reloaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    call = dict(CALL, guidance_scale=2.0)
    assert_same_images(ours(generator=torch.Generator().manual_seed(1), **call).images,
                       reloaded(generator=torch.Generator().manual_seed(1), **call).images)


def test_sigma_scheduler_runs(ldm):
    """Euler needs init_noise_sigma and scale_model_input, which diffusers' LDM pipeline skips."""
    _, _, ours = ldm("ddim")
    pipe = LDMTextToImagePipeline(**{**ours.components,
                                     "scheduler": fusediff.EulerDiscreteScheduler.from_config(ours.scheduler.config)})
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a cat", num_inference_steps=3, output_type="pt").images
    assert images.shape == (1, 3, SIZE, SIZE) and torch.isfinite(images).all()


@pytest.mark.parametrize("kwargs, message", [(dict(prompt=3), "str or a list"), (dict(prompt="a", height=12), "8"),
                                             (dict(prompt="a", output_type="gif"), "output_type")])
def test_bad_arguments(ldm, kwargs, message):
    _, _, ours = ldm("ddim")
    with pytest.raises(ValueError, match=message):
        ours(num_inference_steps=1, **kwargs)


# -- LDMBert -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_dir(ldm):
    return ldm("ddim")[0] / "bert"


def test_bert_matches_diffusers(bert_dir):
    ours, theirs = LDMBertModel.from_pretrained(bert_dir), TheirBert.from_pretrained(bert_dir).eval()
    ids = torch.randint(0, ours.config.vocab_size, (3, 77), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            torch.testing.assert_close(ours(ids, **kwargs)[0], theirs(ids, **kwargs)[0], rtol=0, atol=1e-6)
        hidden = ours(ids, output_hidden_states=True).hidden_states
        assert len(hidden) == LDM_BERT["encoder_layers"] + 1


def test_bert_round_trip_and_config(bert_dir, tmp_path):
    ours = LDMBertModel.from_pretrained(bert_dir, torch_dtype=torch.float64)
    assert ours.dtype == torch.float64 and not ours.training
    ours.to(torch.float32).save_pretrained(tmp_path)
    written, reference = (json.loads((d / "config.json").read_text()) for d in (tmp_path, bert_dir))
    assert set(reference) - set(written) == {"transformers_version"}
    assert {k: written[k] for k in written} == {k: reference[k] for k in written}
    again = TheirBert.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[2, 7, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids)[0], ours(ids)[0], rtol=0, atol=0)


def test_bert_refuses_pickles_missing_weights_and_other_models(bert_dir, tmp_path):
    from safetensors.torch import save_file

    state = LDMBertModel.from_pretrained(bert_dir).state_dict()
    config = (bert_dir / "config.json").read_text()
    (tmp_path / "config.json").write_text(config)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled weights"):
        LDMBertModel.from_pretrained(tmp_path)
    assert LDMBertModel.from_pretrained(tmp_path, allow_pickle=True).config.d_model == LDM_BERT["d_model"]
    (tmp_path / "pytorch_model.bin").unlink()
    del state["to_logits.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing 1: to_logits.bias"):
        LDMBertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not 'ldmbert'"):
        LDMBertModel.from_pretrained(tmp_path)
