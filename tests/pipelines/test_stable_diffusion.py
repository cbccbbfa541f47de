"""StableDiffusionPipeline against HF diffusers: a diffusers directory gives diffusers' images for the same
seed, for every scheduler; fusediff's directories load in diffusers; the call's options and errors."""

from __future__ import annotations

import json
import sys
import types

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from pipelines.tiny_sd import SCHEDULERS, SIZE, assert_same_images, build_sd, edit_index

import fusediff
from fusediff import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionPipelineOutput

# Schedulers compared with diffusers' (tiny_sd.SCHEDULERS names them). When a scheduler is added to
# fusediff, add it here and to tiny_sd.SCHEDULERS; a name listed here whose class fusediff lacks fails.
COMPARED = ["ddim", "pndm", "euler", "euler_a", "dpmpp_2m_karras", "lms", "heun", "deis", "unipc"]
CALL = dict(prompt=["a red cat", "a dog."], negative_prompt=["blurry", ""], guidance_scale=6.0,
            num_inference_steps=3, eta=0.3, output_type="np")


def _seed(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """name -> (directory, diffusers pipeline), built on first use."""
    root, built = tmp_path_factory.mktemp("sd"), {}

    def get(name: str = "ddim"):
        if name not in built:
            built[name] = (root / name, build_sd(root / name, name))
        return built[name]
    return get


def _ours(directory, **kwargs):
    pipe = DiffusionPipeline.from_pretrained(directory, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", COMPARED)
def test_diffusers_directory_gives_diffusers_images(sd, name):
    directory, theirs = sd(name)
    ours = _ours(directory)
    assert type(ours) is StableDiffusionPipeline
    assert type(ours.scheduler) is getattr(fusediff, SCHEDULERS[name][0])
    assert type(ours.unet) is fusediff.UNet2DConditionModel and type(ours.vae) is fusediff.AutoencoderKL
    assert_same_images(ours(generator=_seed(), **CALL).images, theirs(generator=_seed(), **CALL).images)


@pytest.mark.parametrize("pipeline", ["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                                      "StableDiffusionInpaintPipeline"])
@pytest.mark.parametrize("name", ["ddim", "euler_a"])
def test_bit_identical_with_diffusers_components(sd, pipeline, name):
    """Built from diffusers' own models and scheduler, fusediff's pipeline logic (draws, order, arithmetic,
    memory layouts) gives diffusers' images bit for bit."""
    components = sd(name)[1].components
    ours, theirs = getattr(fusediff, pipeline)(**components), getattr(diffusers, pipeline)(**components)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    extra = {"StableDiffusionImg2ImgPipeline": dict(image=image, strength=0.7),
             "StableDiffusionInpaintPipeline": dict(image=image, mask_image=image.convert("L"), strength=0.7)}
    call = dict(CALL, **extra.get(pipeline, {}))
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    gens = lambda: [_seed(1), _seed(2)]  # noqa: E731
    np.testing.assert_array_equal(ours(generator=gens(), **call).images, theirs(generator=gens(), **call).images)


@pytest.mark.parametrize("name", ["ddim", "euler_a"])  # euler_a draws noise at every step
def test_generator_list_and_images_per_prompt(sd, name):
    directory, theirs = sd(name)
    ours = _ours(directory)
    call = dict(prompt="a cat", num_images_per_prompt=3, num_inference_steps=2, guidance_scale=4.0, output_type="np")
    gens = lambda: [_seed(i) for i in (3, 1, 2)]  # noqa: E731
    images = ours(generator=gens(), **call).images
    assert_same_images(images, theirs(generator=gens(), **call).images)
    assert np.abs(images[0] - images[1]).max() > 0.01  # each image its own noise


def test_fusediff_directory_loads_in_diffusers(sd, tmp_path):
    directory, _ = sd("ddim")
    ours = _ours(directory)
    ours.save_pretrained(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"] and index["safety_checker"] == [None, None]
    reloaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "ours")
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded).__name__ == "StableDiffusionPipeline"
    assert_same_images(ours(generator=_seed(), **CALL).images, reloaded(generator=_seed(), **CALL).images)


def test_scheduler_swap_with_from_config(sd, tmp_path):
    directory, theirs = sd("ddim")
    ours = _ours(directory)
    ours.scheduler = fusediff.DPMSolverMultistepScheduler.from_config(ours.scheduler.config, use_karras_sigmas=True)
    original = theirs.scheduler
    try:
        theirs.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(original.config, use_karras_sigmas=True)
        assert_same_images(ours(generator=_seed(), **CALL).images, theirs(generator=_seed(), **CALL).images)
    finally:
        theirs.scheduler = original
    ours.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    assert type(_ours(tmp_path).scheduler) is fusediff.DPMSolverMultistepScheduler


def test_guidance_rescale_and_custom_sigmas(sd):
    directory, theirs = sd("euler")
    ours = _ours(directory)
    call = dict(CALL, guidance_rescale=0.7)
    assert_same_images(ours(generator=_seed(), **call).images, theirs(generator=_seed(), **call).images)
    call = dict(CALL, num_inference_steps=None, sigmas=[14.6, 4.0, 1.0])
    assert_same_images(ours(generator=_seed(), **call).images, theirs(generator=_seed(), **call).images)


def test_clip_skip(sd):
    """clip_skip=1: the penultimate CLIP layer through the final LayerNorm (diffusers 0.42 fails here with
    transformers 5, whose CLIPTextModel has no .text_model, so the embeddings are built by hand)."""
    ours = _ours(sd("ddim")[0])
    ids = ours.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = ours.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        expected = ours.text_encoder.final_layer_norm(hidden)
    positive, _ = ours.encode_prompt("a cat", ours.device, 1, False, clip_skip=1)
    torch.testing.assert_close(positive, expected, rtol=0, atol=0)
    call = dict(num_inference_steps=2, guidance_scale=1.0, output_type="np")
    np.testing.assert_array_equal(ours("a cat", clip_skip=1, generator=_seed(), **call).images,
                                  ours(prompt_embeds=expected, generator=_seed(), **call).images)


def test_old_scheduler_config_is_fixed_as_diffusers_does(tmp_path, caplog):
    """clip_sample=True and steps_offset=0 (early SD configs): diffusers' pipeline forces False and 1."""
    theirs = build_sd(tmp_path / "sd", "ddim")
    config = json.loads((tmp_path / "sd" / "scheduler" / "scheduler_config.json").read_text())
    config.update(clip_sample=True, steps_offset=0)
    (tmp_path / "sd" / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "sd")
    theirs.set_progress_bar_config(disable=True)
    ours = _ours(tmp_path / "sd")
    assert ours.scheduler.config.clip_sample is False and ours.scheduler.config.steps_offset == 1
    assert "clip_sample=False" in caplog.text
    assert_same_images(ours(generator=_seed(), **CALL).images, theirs(generator=_seed(), **CALL).images)


def test_prompt_embeds_give_the_prompts_images(sd):
    ours = _ours(sd("ddim")[0])
    positive, negative = ours.encode_prompt(CALL["prompt"], ours.device, 1, True, CALL["negative_prompt"])
    assert positive.shape == negative.shape == (2, 77, 16)
    call = {k: v for k, v in CALL.items() if k not in ("prompt", "negative_prompt")}
    by_embeds = ours(prompt_embeds=positive, negative_prompt_embeds=negative, generator=_seed(), **call).images
    np.testing.assert_array_equal(by_embeds, ours(generator=_seed(), **CALL).images)


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_output_types(sd, output_type):
    ours = _ours(sd("ddim")[0])
    out = ours("a cat", num_inference_steps=2, output_type=output_type, generator=_seed())
    assert isinstance(out, StableDiffusionPipelineOutput) and out.nsfw_content_detected is None
    images = out.images
    if output_type == "pil":
        assert len(images) == 1 and isinstance(images[0], PIL.Image.Image) and images[0].size == (SIZE, SIZE)
    elif output_type == "np":
        assert images.shape == (1, SIZE, SIZE, 3) and 0 <= images.min() and images.max() <= 1
    elif output_type == "pt":
        assert images.shape == (1, 3, SIZE, SIZE) and not images.requires_grad
    else:
        assert images.shape == (1, 4, SIZE // 4, SIZE // 4)
    assert ours("a cat", num_inference_steps=2, output_type=output_type, return_dict=False)[1] is None


def test_callback_on_step_end(sd):
    ours = _ours(sd("ddim")[0])
    seen = []

    def record(pipe, i, t, tensors):
        seen.append((i, int(t), sorted(tensors), tensors["prompt_embeds"].shape[0]))
        return {"latents": tensors["latents"] * 0} if i == 2 else {}

    out = ours("a cat", num_inference_steps=3, guidance_scale=5.0, callback_on_step_end=record, output_type="latent",
               callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert [s[0] for s in seen] == [0, 1, 2] and [s[1] for s in seen] == ours.scheduler.timesteps.tolist()
    assert seen[0][2] == ["latents", "prompt_embeds"] and seen[0][3] == 2  # [negative; positive]
    assert torch.count_nonzero(out.images) == 0  # the callback's latents replaced the run's
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        ours("a cat", num_inference_steps=1, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["vae"])


def test_progress_bar_counts_steps(sd, capsys):
    ours = _ours(sd("heun")[0])  # second order: 5 model calls for 3 steps, the bar counts 3
    ours.set_progress_bar_config(desc="sd-steps")
    ours("a cat", num_inference_steps=3, output_type="latent")
    assert "sd-steps" in capsys.readouterr().err and ours.num_timesteps == 5


def test_torch_dtype(sd):
    ours = _ours(sd("ddim")[0], torch_dtype=torch.bfloat16)
    assert ours.unet.dtype == ours.vae.dtype == ours.text_encoder.dtype == torch.bfloat16
    images = ours("a cat", num_inference_steps=2, output_type="pt", generator=_seed()).images
    assert images.dtype == torch.bfloat16 and torch.isfinite(images).all()


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(prompt="a", height=30), ValueError, "multiple of 8"),
    (dict(prompt="a", width=0), ValueError, "multiple of 8"),
    (dict(prompt=None), ValueError, "prompt"),
    (dict(prompt="a", prompt_embeds=torch.zeros(1, 77, 16)), ValueError, "not both"),
    (dict(prompt=3), ValueError, "str or a list"),
    (dict(prompt="a", negative_prompt=["b"]), TypeError, "negative_prompt"),
    (dict(prompt=["a", "b"], negative_prompt=["c"]), ValueError, "negative prompts"),
    (dict(prompt="a", output_type="jpg"), ValueError, "output_type"),
    (dict(prompt="a", num_images_per_prompt=0), ValueError, "num_images_per_prompt"),
    (dict(prompt="a", generator=[torch.Generator()] * 3), ValueError, "generators"),
    (dict(prompt="a", latents=torch.zeros(1, 4, 4, 4)), ValueError, "latents have shape"),
    (dict(prompt="a", num_inference_steps=0), ValueError, "num_inference_steps"),
    (dict(prompt="a", timesteps=[999, 1]), ValueError, "custom timesteps"),  # DDIM takes none
])
def test_bad_call_arguments(sd, kwargs, error, message):
    ours = _ours(sd("ddim")[0])
    with pytest.raises(error, match=message):
        ours(num_inference_steps=kwargs.pop("num_inference_steps", 2), **kwargs)


def test_safety_checker_entry_loads_as_none(sd, tmp_path, caplog):
    """Real SD directories name diffusers' safety checker; fusediff has none and loads it as None."""
    directory, theirs = sd("ddim")
    theirs.save_pretrained(tmp_path / "sd")
    edit_index(tmp_path / "sd", safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
               feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
    ours = _ours(tmp_path / "sd")
    assert ours.safety_checker is None and ours.feature_extractor is None
    assert "'safety_checker' (StableDiffusionSafetyChecker) is not supported" in caplog.text
    assert "without a safety checker" in caplog.text
    assert ours.config.requires_safety_checker is True
    ours.save_pretrained(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["requires_safety_checker"] is True and index["safety_checker"] == [None, None]


def test_missing_transformers_names_the_text_extra(sd, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "fusediff\[text\]"'):
        DiffusionPipeline.from_pretrained(sd("ddim")[0])


def test_a_given_safety_checker_runs_as_in_diffusers(sd):
    """A checker passed in (diffusers' StableDiffusionSafetyChecker, here a stand-in) sees PIL images through the
    feature extractor; a flagged image stays as the checker returns it (black) instead of being denormalised."""
    ours = _ours(sd("ddim")[0])

    class Features:
        def __call__(self, images, return_tensors):
            assert return_tensors == "pt" and all(isinstance(i, PIL.Image.Image) for i in images)
            batch = types.SimpleNamespace(pixel_values=torch.zeros(len(images), 3, 8, 8))
            batch.to = lambda device: batch
            return batch

    def checker(images, clip_input):
        assert clip_input.shape[0] == images.shape[0] == 2
        images = images.clone()
        images[0] = 0  # what diffusers' checker does to a flagged image
        return images, [True, False]

    call = dict(CALL, output_type="np")
    plain = ours(generator=_seed(), **call).images
    checked = StableDiffusionPipeline(**{**ours.components, "safety_checker": checker, "feature_extractor": Features()})
    checked.set_progress_bar_config(disable=True)
    out = checked(generator=_seed(), **call)
    assert out.nsfw_content_detected == [True, False]
    assert np.all(out.images[0] == 0) and np.array_equal(out.images[1], plain[1])


def test_hub_download_fetches_only_what_loads(sd, tmp_path, monkeypatch):
    """From a Hub repo: model_index.json first, then the loaded components' folders, without the safety
    checker, pickles, other frameworks' weights or other variants (offline, from a cache built here)."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects
    from support.hub_cache import add_to_cache

    sd("ddim")[1].save_pretrained(tmp_path / "repo")
    edit_index(tmp_path / "repo", safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"])
    add_to_cache(tmp_path / "cache", "fusediff-test/tiny-sd", tmp_path / "repo")
    calls, real = [], huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append(kw) or real(repo, **kw))
    pipe = DiffusionPipeline.from_pretrained("fusediff-test/tiny-sd", cache_dir=tmp_path / "cache",
                                             local_files_only=True)
    assert type(pipe) is StableDiffusionPipeline and pipe.safety_checker is None
    assert calls[0]["allow_patterns"] == ["model_index.json"]
    repo_files = ["model_index.json", "v1-5-pruned.safetensors", "safety_checker/model.safetensors",
                  "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
                  "unet/diffusion_pytorch_model.non_ema.safetensors", "text_encoder/model.safetensors",
                  "text_encoder/pytorch_model.bin", "text_encoder/flax_model.msgpack", "tokenizer/vocab.json",
                  "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"]
    fetched = filter_repo_objects(repo_files, allow_patterns=calls[1]["allow_patterns"],
                                  ignore_patterns=calls[1]["ignore_patterns"])
    assert sorted(fetched) == ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/model.safetensors",
                               "tokenizer/vocab.json", "unet/diffusion_pytorch_model.safetensors",
                               "vae/diffusion_pytorch_model.safetensors"]


def test_guidance_distilled_unet(sd, tmp_path):
    """A UNet with time_cond_proj_dim (LCM-style) takes w as an embedding instead of a guided batch."""
    from pipelines.tiny_sd import UNET

    _, theirs = sd("euler")
    torch.manual_seed(0)
    pipe = diffusers.StableDiffusionPipeline(**{**theirs.components,
                                                "unet": diffusers.UNet2DConditionModel(**UNET, time_cond_proj_dim=8)})
    pipe.save_pretrained(tmp_path)
    ours, theirs = _ours(tmp_path), diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    theirs.set_progress_bar_config(disable=True)
    call = dict(prompt="a cat", num_inference_steps=2, guidance_scale=6.0, output_type="np")
    assert_same_images(ours(generator=_seed(), **call).images, theirs(generator=_seed(), **call).images)
    assert not ours.do_classifier_free_guidance
