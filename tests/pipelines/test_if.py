"""DeepFloyd IF pipelines (stage I, img2img, stage II super resolution) against HF diffusers 0.42.1.

Tiny random pipelines are built and saved by diffusers (tests/pipelines/tiny_if.py), loaded by fusediff
and run with the same seed; images are compared in float32 on the CPU (max |diff| printed). Two kinds
of comparison:
- fusediff's own UNet and DDPM scheduler against diffusers': within ATOL = 1e-4 on [0, 1] images.
  The models' last-bit differences grow with the guidance weight w (eps_u + w (eps_c - eps_u)
  carries about 2w - 1 times a difference of the two halves, and each step divides eps by
  sqrt(alpha-bar) to predict x0): measured over 3 steps (2 seeds), max |diff| about 1e-5 unguided,
  5e-5 to 8e-5 at w = 4 and 1.3e-4 to 3.8e-4 at w = 7. So w = 3 guides here; the model-level
  parity is tested in tests/models.
- fusediff's pipelines holding diffusers' own UNet and scheduler: identical images at w = 7, which
  checks the pipelines' logic (random draws, guidance on eps with the conditional variance, noise
  augmentation, strength) exactly.
- float64 at w = 7 (IF's default), models and tensors float64: fusediff's images equal diffusers' within
  ATOL_64 = 1e-9 (measured 7e-13), so the float32 misses at w = 7 are rounding, amplified: each float32
  implementation is 2e-4 .. 4.5e-4 from the float64 run (measured, noise drawn in float32 for both;
  fusediff's error 0.7x .. 1.4x diffusers'). Two float32 roundings of diffusers are taken out of that
  float64 reference, or it differs from fusediff's float64 by 1e-5: its AttentionPooling (the UNet's text
  pooling) casts the scores to float32 before the softmax (4e-8 at the pooled embedding, amplified by the
  guidance and 1/sqrt(alpha-bar_999) ~ 2e4 to 1.5e-5 in the images), and its DDPMScheduler computes the step
  scalars in float32 from float32 tables where fusediff's computes them in float64 from the same tables
  (1e-6 in the images); the reference gets float64 copies of the tables (tests/schedulers/parity.py's twin)
  and a float64 softmax.
"""

from __future__ import annotations

import contextlib
import copy
import json

import diffusers
import numpy as np
import pytest
import torch
from pipelines.tiny_if import ATOL, LOW, SIZE, build_if
from pipelines.tiny_sd import assert_same_images, edit_index

import fusediff
from fusediff import DiffusionPipeline, IFImg2ImgPipeline, IFPipeline, IFPipelineOutput

STAGES = ["IFPipeline", "IFImg2ImgPipeline", "IFSuperResolutionPipeline"]
PROMPTS = dict(prompt=["a red cat", "  A Dog. "], negative_prompt=["blurry", ""])
GUIDED = 3.0  # fusediff's models against diffusers' (see the module docstring)
ATOL_64 = 1e-9  # float64 images at w = 7: measured at most 7e-13


def _seed(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _image_input(name: str, batch: int = 2) -> dict:
    """The image argument of stage ``name`` (none for stage I), in [-1, 1] as stage I's "pt" output."""
    if name == "IFPipeline":
        return {}
    side = SIZE if name == "IFImg2ImgPipeline" else LOW
    image = torch.rand(batch, 3, side, side, generator=_seed(7)) * 2 - 1
    if name == "IFImg2ImgPipeline":  # 3 of DDPM's 4 steps (500, 250, 0)
        return dict(image=image, strength=0.8, num_inference_steps=4)
    return dict(image=image, noise_level=200)


def _call(name: str, guidance_scale: float, **changes) -> dict:
    return {**PROMPTS, "num_inference_steps": 3, "guidance_scale": guidance_scale, "output_type": "np",
            **_image_input(name), **changes}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (directory, diffusers pipeline), built on first use."""
    root, built = tmp_path_factory.mktemp("if"), {}

    def get(name: str = "IFPipeline", variance_type: str = "learned_range"):
        key = (name, variance_type)
        if key not in built:
            directory = root / f"{name}-{variance_type}"
            built[key] = (directory, build_if(directory, name, variance_type=variance_type))
        return built[key]
    return get


def _ours(directory, **kwargs):
    pipe = DiffusionPipeline.from_pretrained(directory, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_same(ours, theirs, atol: float = ATOL, what: str = "") -> float:
    """tiny_sd's comparison (same shape, max |diff| printed and within ``atol``, not constant) with a label."""
    print(what, end=": ")
    return assert_same_images(ours, theirs, atol)


@pytest.mark.parametrize("guidance_scale", [1.0, GUIDED], ids=["unguided", "guided"])
@pytest.mark.parametrize("name", STAGES)
def test_diffusers_directory_gives_diffusers_images(tiny, name, guidance_scale):
    directory, theirs = tiny(name)
    ours = _ours(directory)
    assert type(ours) is getattr(fusediff, name)
    assert type(ours.unet) is fusediff.UNet2DConditionModel and type(ours.scheduler) is fusediff.DDPMScheduler
    call = _call(name, guidance_scale)
    assert_same(ours(generator=_seed(), **call).images, theirs(generator=_seed(), clean_caption=False, **call).images,
                what=f"{name} w={guidance_scale}")


@pytest.mark.parametrize("name", STAGES)
def test_with_diffusers_models_the_images_are_identical(tiny, name):
    """fusediff's loop around diffusers' own UNet and scheduler reproduces diffusers' pipeline bit for bit."""
    directory, theirs = tiny(name)
    ours = _ours(directory, unet=theirs.unet, scheduler=theirs.scheduler)
    call = _call(name, 7.0, output_type="pt")
    assert_same(ours(generator=_seed(), **call).images, theirs(generator=_seed(), clean_caption=False, **call).images,
                atol=0.0, what=f"{name} with diffusers' models")


@contextlib.contextmanager
def _diffusers_pooling_in_float64():
    """diffusers' AttentionPooling with its float32 cast of the scores made a no-op for float64 tensors."""
    import diffusers.models.embeddings as embeddings

    forward, to_float = embeddings.AttentionPooling.forward, torch.Tensor.float

    def keep_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else to_float(self, *args, **kwargs)

    def pooled(self, x):
        torch.Tensor.float = keep_float64
        try:
            return forward(self, x)
        finally:
            torch.Tensor.float = to_float
    embeddings.AttentionPooling.forward = pooled
    try:
        yield
    finally:
        embeddings.AttentionPooling.forward = forward


def _float64_reference(theirs):
    """diffusers' pipeline in float64, its schedulers' tables float64 (their values are the float32 tables')."""
    pipe = copy.deepcopy(theirs).to(dtype=torch.float64)
    for name in ("scheduler", "image_noising_scheduler"):
        scheduler = getattr(pipe, name, None)
        if scheduler is not None:
            for table in ("alphas_cumprod", "one", "betas", "alphas"):
                setattr(scheduler, table, getattr(scheduler, table).double())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", STAGES)
def test_float64_images_match_diffusers_at_default_guidance(tiny, name):
    """Float64 at w = 7: the same images within ATOL_64 (see the module docstring for the reference's two changes)."""
    directory, theirs = tiny(name)
    ours = _ours(directory)
    ours.to(dtype=torch.float64)
    call = _call(name, 7.0, output_type="pt")
    if "image" in call:
        call["image"] = call["image"].double()
    with _diffusers_pooling_in_float64():
        expected = _float64_reference(theirs)(generator=_seed(), clean_caption=False, **call).images
    images = ours(generator=_seed(), **call).images
    assert images.dtype == expected.dtype == torch.float64
    assert_same(images.numpy(), expected.numpy(), atol=ATOL_64, what=f"{name} float64 w=7")


@pytest.mark.parametrize("name", STAGES)
def test_fusediff_directory_loads_in_diffusers(tiny, tmp_path, name):
    directory, _ = tiny(name)
    ours = _ours(directory)
    ours.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == name and index["text_encoder"] == ["transformers", "T5EncoderModel"]
    assert index["watermarker"] == [None, None] and index["requires_safety_checker"] is False
    theirs = getattr(diffusers, name).from_pretrained(tmp_path / "saved")
    theirs.set_progress_bar_config(disable=True)
    assert type(theirs.unet) is diffusers.UNet2DConditionModel
    call = _call(name, GUIDED)
    assert_same(ours(generator=_seed(), **call).images, theirs(generator=_seed(), clean_caption=False, **call).images,
                what=f"{name} saved by fusediff")


@pytest.mark.parametrize("name", ["IFPipeline", "IFSuperResolutionPipeline"])
def test_fixed_variance_scheduler(tiny, name):
    """A scheduler without a learned variance: the UNet's variance channels are dropped (after guidance)."""
    directory, theirs = tiny(name, variance_type="fixed_small")
    call = _call(name, GUIDED)
    assert_same(_ours(directory)(generator=_seed(), **call).images,
                theirs(generator=_seed(), clean_caption=False, **call).images, what=f"{name} fixed_small")


def test_images_per_prompt_generator_list_and_pil_output(tiny):
    directory, theirs = tiny("IFSuperResolutionPipeline")
    call = _call("IFSuperResolutionPipeline", GUIDED, num_images_per_prompt=2, output_type="pil",
                 height=2 * LOW, width=LOW)
    ours = _ours(directory)(generator=[_seed(i) for i in range(4)], **call).images
    expected = theirs(generator=[_seed(i) for i in range(4)], clean_caption=False, **call).images
    assert len(ours) == 4 and ours[0].size == (LOW, 2 * LOW)
    # PIL rounds to 1/255: allow one level
    assert_same(np.stack([np.asarray(i) for i in ours]) / 255, np.stack([np.asarray(i) for i in expected]) / 255,
                atol=1 / 255 + 1e-6, what="PIL, 2 images per prompt")


def test_encode_prompt_and_prompt_embeds(tiny):
    directory, theirs = tiny("IFPipeline")
    ours = _ours(directory)
    mine = ours.encode_prompt(["A cat ", "dog"], num_images_per_prompt=2, negative_prompt=["x", "y"])
    expected = theirs.encode_prompt(["A cat ", "dog"], num_images_per_prompt=2, negative_prompt=["x", "y"])
    for a, b in zip(mine, expected):
        assert a.shape == (4, 77, 32)
        assert torch.equal(a, b)
    assert ours.encode_prompt("a", do_classifier_free_guidance=False)[1] is None
    call = dict(num_inference_steps=2, guidance_scale=GUIDED, output_type="pt")
    by_embeds = ours(prompt_embeds=mine[0][::2], negative_prompt_embeds=mine[1][::2], generator=_seed(), **call)
    by_text = ours(prompt=["A cat ", "dog"], negative_prompt=["x", "y"], generator=_seed(), **call)
    assert torch.equal(by_embeds.images, by_text.images)
    # without a text encoder, embeddings still work (diffusers' optional components)
    bare = IFPipeline(**{**ours.components, "tokenizer": None, "text_encoder": None}, requires_safety_checker=False)
    bare.set_progress_bar_config(disable=True)
    assert torch.equal(bare(prompt_embeds=mine[0][::2], negative_prompt_embeds=mine[1][::2], generator=_seed(),
                            **call).images, by_text.images)
    with pytest.raises(ValueError, match="prompt_embeds"):
        bare(prompt="a cat", **call)


def test_stage_one_output_feeds_stage_two(tiny):
    """output_type="pt" is the raw sample in [-1, 1] (diffusers' too), which stage II takes as its image."""
    d1, theirs1 = tiny("IFPipeline")
    d2, theirs2 = tiny("IFSuperResolutionPipeline")
    call = dict(PROMPTS, num_inference_steps=2, guidance_scale=GUIDED)
    ours_low = _ours(d1)(generator=_seed(), output_type="pt", height=LOW, width=LOW, **call).images
    their_low = theirs1(generator=_seed(), output_type="pt", height=LOW, width=LOW, clean_caption=False, **call).images
    assert ours_low.shape == (2, 3, LOW, LOW) and ours_low.min() < 0
    assert_same(ours_low, their_low, atol=2 * ATOL, what="stage I in [-1, 1]")
    ours = _ours(d2)(image=their_low, generator=_seed(1), output_type="np", **call).images
    expected = theirs2(image=their_low, generator=_seed(1), output_type="np", clean_caption=False, **call).images
    assert_same(ours, expected, what="stage II of stage I's output")


def test_output_object_tuple_and_callbacks(tiny):
    directory, _ = tiny("IFPipeline")
    ours = _ours(directory)
    out = ours("a cat", num_inference_steps=3, guidance_scale=GUIDED, generator=_seed(), output_type="np")
    assert isinstance(out, IFPipelineOutput) and out.nsfw_detected is None and out.watermark_detected is None
    assert ours.num_timesteps == 3 and ours.do_classifier_free_guidance
    images, nsfw, watermark = ours("a cat", num_inference_steps=3, guidance_scale=GUIDED, generator=_seed(),
                                   output_type="np", return_dict=False)
    assert np.array_equal(images, out.images) and nsfw is None and watermark is None
    seen = []
    ours("a cat", num_inference_steps=3, generator=_seed(), callback=lambda i, t, x: seen.append((i, int(t), x.shape)),
         callback_steps=2)
    assert seen == [(0, 666, (1, 3, SIZE, SIZE)), (2, 0, (1, 3, SIZE, SIZE))]  # DDPM's 3 steps: 666, 333, 0

    def zero(pipe, i, t, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])}
    zeroed = ours("a cat", num_inference_steps=1, generator=_seed(), callback_on_step_end=zero, output_type="pt")
    assert torch.equal(zeroed.images, torch.zeros(1, 3, SIZE, SIZE))


@pytest.mark.parametrize("name", STAGES)
def test_safety_components_named_in_model_index_load_as_none(tiny, tmp_path, caplog, name):
    """Released IF directories name diffusers' safety checker, feature extractor and watermarker."""
    directory, _ = tiny(name)
    import shutil

    shutil.copytree(directory, tmp_path / "released")
    edit_index(tmp_path / "released", safety_checker=["deepfloyd_if", "IFSafetyChecker"],
               feature_extractor=["transformers", "CLIPImageProcessor"], watermarker=["deepfloyd_if", "IFWatermarker"],
               requires_safety_checker=True)
    ours = _ours(tmp_path / "released")
    assert type(ours) is getattr(fusediff, name)
    assert ours.safety_checker is None and ours.feature_extractor is None and ours.watermarker is None
    for component in ("IFSafetyChecker", "CLIPImageProcessor", "IFWatermarker"):
        assert f"({component}) is not supported" in caplog.text
    assert "without a safety checker or watermarker" in caplog.text and ours.config.requires_safety_checker is True


def test_given_safety_components_are_not_used(tiny, caplog):
    directory, theirs = tiny("IFPipeline")
    watermarker = diffusers.pipelines.deepfloyd_if.IFWatermarker()
    pipe = IFPipeline(**{**_ours(directory).components, "watermarker": watermarker}, requires_safety_checker=False)
    assert pipe.watermarker is None and "watermarker not supported by fusediff" in caplog.text


def test_img2img_loads_a_stage_one_directory(tiny):
    directory, theirs = tiny("IFPipeline")
    img2img = IFImg2ImgPipeline.from_pretrained(directory)
    img2img.set_progress_bar_config(disable=True)
    reference = diffusers.IFImg2ImgPipeline(**theirs.components)
    reference.set_progress_bar_config(disable=True)
    call = _call("IFImg2ImgPipeline", GUIDED)
    assert_same(img2img(generator=_seed(), **call).images,
                reference(generator=_seed(), clean_caption=False, **call).images, what="img2img from stage I")


def test_super_resolution_components(tiny):
    directory, _ = tiny("IFSuperResolutionPipeline")
    ours = _ours(directory)
    assert isinstance(ours.image_noising_scheduler, fusediff.DDPMScheduler)
    assert list(ours.components)[:5] == ["tokenizer", "text_encoder", "unet", "scheduler", "image_noising_scheduler"]


@pytest.mark.parametrize("name", ["IFPipeline", "IFSuperResolutionPipeline"])
def test_channels_last_and_cuda_graph_switch(tiny, name):
    """The SD pipelines' run-time switches reach the IF loop: a channels-last UNet gives the same images
    (the loop converts the sample once), and enable_cuda_graph() on the CPU runs eagerly with a warning
    (the graphs themselves are exercised on CUDA by the SD pipelines' tests, through the same loop)."""
    directory, _ = tiny(name)
    ours = _ours(directory)
    call = _call(name, GUIDED, output_type="pt")
    expected = ours(generator=_seed(), **call).images
    ours.unet.to(memory_format=torch.channels_last)
    eager = ours(generator=_seed(), **call).images  # the sample in [-1, 1]: twice the [0, 1] bound
    assert_same(eager, expected, atol=2 * ATOL, what="channels-last")
    ours.enable_cuda_graph()
    with pytest.warns(RuntimeWarning, match="CUDA graph capture is not possible"):
        graphed = ours(generator=_seed(), **call).images
    assert torch.equal(graphed, eager)
