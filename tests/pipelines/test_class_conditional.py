"""ClassConditionalPipeline against a hand-written classifier-free-guidance loop over HF diffusers' own
UNet2DModel and schedulers (same weights, loaded from the directory the pipeline saved; same noise),
the shape of its model calls, saving and loading, and its errors.

The reference makes two separate UNet calls per step (conditional, then null class) and combines them
as eps_u + s (eps_c - eps_u), so the pipeline's single batched call and its guidance are checked
against an independent computation.
"""

from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
import torch
from support.parity import assert_close, one_thread  # noqa: F401  (one_thread: autouse)

import fusediff
import fusediff.models.unet_2d
from fusediff import (ClassConditionalPipeline, DDIMScheduler, DDPMScheduler, DiffusionPipeline,
                      EulerAncestralDiscreteScheduler, UNet2DModel)

NUM_CLASSES = 4  # + 1 null class, the last row of the table
UNET = dict(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=8, num_class_embeds=NUM_CLASSES + 1)
TRAIN = dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
ATOL = 1e-4  # images in [0, 1], as the other pipeline parity tests
SCHEDULERS = {  # name: (fusediff class, diffusers class name, config overrides, step arguments)
    "ddim": (DDIMScheduler, "DDIMScheduler", {}, {"eta": 0.0}),
    "ddim_eta": (DDIMScheduler, "DDIMScheduler", {}, {"eta": 0.7}),
    "euler_a": (EulerAncestralDiscreteScheduler, "EulerAncestralDiscreteScheduler", {}, {}),
}


def _unet(seed: int = 0, **overrides) -> UNet2DModel:
    torch.manual_seed(seed)
    unet = UNet2DModel(**dict(UNET, **overrides)).eval()
    with torch.no_grad():  # random weights large enough that classes and guidance change the output
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


def _pipe(scheduler=None, **options) -> ClassConditionalPipeline:
    pipe = ClassConditionalPipeline(unet=_unet(), scheduler=scheduler or DDPMScheduler(**TRAIN), **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A pipeline directory saved by fusediff, and diffusers' UNet loaded from it."""
    directory = tmp_path_factory.mktemp("class-cond") / "pipe"
    _pipe().save_pretrained(directory)
    theirs = diffusers.UNet2DModel.from_pretrained(directory / "unet").eval()
    return directory, theirs


def _reference(unet, scheduler, labels: list[int], null: int, scale: float, steps: int, seed: int,
               step_kwargs: dict) -> np.ndarray:
    """Classifier-free guidance written out with diffusers' components: x_T as diffusers' pipelines draw
    it on the CPU, eps_c and eps_u from two calls, diffusers' scheduler step; (B, H, W, C) in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    shape = (len(labels), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    y = torch.tensor(labels)
    y0 = torch.full_like(y, null)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            eps_c = unet(x_in, t, class_labels=y).sample
            if scale != 1.0:
                eps_u = unet(x_in, t, class_labels=y0).sample
                eps_c = eps_u + scale * (eps_c - eps_u)
            x = scheduler.step(eps_c, t, x, **step_kwargs, generator=generator).prev_sample
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _compare(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
    where = np.unravel_index(diff.argmax(), diff.shape)
    print(f"max |ours - reference| {diff.max():.2e} at {where}")
    assert diff.max() <= ATOL, f"max |diff| {diff.max():.3g} at {where}: ours {ours[where]}, reference {theirs[where]}"
    assert theirs.std() > 0.01  # not two constant images


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("scale", [1.0, 3.0, 0.0])
def test_matches_a_guided_loop_over_diffusers_components(saved, scheduler, scale):
    directory, theirs_unet = saved
    ours_cls, theirs_name, overrides, step_kwargs = SCHEDULERS[scheduler]
    pipe = DiffusionPipeline.from_pretrained(directory)
    assert type(pipe) is ClassConditionalPipeline
    pipe.scheduler = ours_cls.from_config(pipe.scheduler.config, **overrides)
    pipe.set_progress_bar_config(disable=True)
    labels = [2, 0, 3]
    ours = pipe(labels, guidance_scale=scale, num_inference_steps=6, output_type="np",
                generator=torch.Generator().manual_seed(5), **step_kwargs).images
    theirs_scheduler = getattr(diffusers, theirs_name).from_pretrained(directory / "scheduler", **overrides)
    expected = _reference(theirs_unet, theirs_scheduler, labels, NUM_CLASSES, scale, 6, 5, step_kwargs)
    _compare(ours, expected)


def test_guidance_changes_the_images_and_classes_matter():
    """The comparisons above would pass for a pipeline that ignored labels or guidance only if the
    reference did too: check that both change the output here."""
    pipe = _pipe()
    run = lambda labels, s: pipe(labels, guidance_scale=s, num_inference_steps=4, output_type="np",  # noqa: E731
                                 generator=torch.Generator().manual_seed(0)).images
    base = run([1, 1], 1.0)
    assert np.abs(run([1, 1], 4.0) - base).max() > 1e-2
    assert np.abs(run([2, 3], 1.0) - base).max() > 1e-2


def _record_unet_calls(pipe) -> list[tuple[tuple[int, ...], list[int]]]:
    calls = []

    def hook(module, args, kwargs):
        calls.append((tuple(args[0].shape), kwargs["class_labels"].tolist()))

    pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


@pytest.mark.parametrize("scale, null", [(2.5, -1), (2.5, 0), (1.0, -1)])
def test_one_model_call_per_step_on_cond_then_null(scale, null):
    pipe = _pipe(null_class_label=null)
    calls = _record_unet_calls(pipe)
    labels = [1, 2, 1] if null == 0 else [0, 3, 1]
    pipe(labels, guidance_scale=scale, num_inference_steps=5, output_type="pt")
    null_row = null % (NUM_CLASSES + 1)
    expected = (labels + [null_row] * 3, 6) if scale != 1.0 else (labels, 3)
    assert len(calls) == 5, calls
    for shape, model_labels in calls:
        assert model_labels == expected[0] and shape[0] == expected[1], (shape, model_labels)


def test_guidance_one_with_null_class_label_none_is_a_plain_conditional_loop(saved):
    directory, theirs_unet = saved
    pipe = DiffusionPipeline.from_pretrained(directory, null_class_label=None, guidance_scale=1.0)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.null_class is None and pipe.class_ids == list(range(NUM_CLASSES + 1))
    labels = [4, 0]  # without a null class the last row is an ordinary class
    ours = pipe(labels, num_inference_steps=5, output_type="np", generator=torch.Generator().manual_seed(1)).images
    scheduler = diffusers.DDIMScheduler.from_pretrained(directory / "scheduler")
    _compare(ours, _reference(theirs_unet, scheduler, labels, -1, 1.0, 5, 1, {"eta": 0.0}))


def test_one_generator_per_image_draws_each_image_alone():
    pipe = _pipe()
    both = pipe([1, 3], num_inference_steps=4, output_type="np",
                generator=[torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]).images
    for i, (label, seed) in enumerate([(1, 10), (3, 11)]):
        alone = pipe(label, num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(seed))
        np.testing.assert_allclose(both[i], alone.images[0], atol=1e-5)


def test_latents_and_callback():
    pipe = _pipe(scheduler=DDIMScheduler(**TRAIN))
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(2, 2, 8, 8, generator=g)
    drawn = pipe([0, 1], num_inference_steps=3, generator=torch.Generator().manual_seed(3), output_type="pt").images
    given = pipe([0, 1], num_inference_steps=3, latents=x_t, output_type="pt").images
    assert_close(given, drawn, "latents given vs drawn from the same seed", rtol=0)
    seen = []

    def callback(p, i, t, tensors):
        seen.append((i, int(t), tuple(tensors["latents"].shape)))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 2 else None

    out = pipe([0, 1], num_inference_steps=3, latents=x_t, output_type="pt", callback_on_step_end=callback).images
    assert [s[0] for s in seen] == [0, 1, 2] and [s[1] for s in seen] == pipe.scheduler.timesteps.tolist()
    assert torch.equal(out, torch.full_like(out, 0.5))  # the replaced final latents, decoded


def test_output_types_and_tuple():
    pipe = _pipe()
    args = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    pil = pipe([0, 1], **args).images
    assert len(pil) == 2 and pil[0].size == (8, 8)
    pt = pipe([0, 1], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt",
              return_dict=False)[0]
    assert pt.shape == (2, 2, 8, 8) and 0 <= pt.min() and pt.max() <= 1


def test_save_and_load_round_trip_keeps_settings_and_images(tmp_path):
    pipe = _pipe(null_class_label=0, guidance_scale=3.5)
    assert type(pipe.scheduler) is DDIMScheduler  # the DDPM training scheduler samples with DDIM
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "ClassConditionalPipeline"
    assert index["null_class_label"] == 0 and index["guidance_scale"] == 3.5
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is ClassConditionalPipeline and loaded.null_class == 0 and loaded.default_guidance_scale == 3.5
    loaded.set_progress_bar_config(disable=True)
    args = dict(num_inference_steps=3, output_type="np")
    a = pipe([1, 4], generator=torch.Generator().manual_seed(2), **args).images
    b = loaded([1, 4], generator=torch.Generator().manual_seed(2), **args).images
    np.testing.assert_array_equal(a, b)
    with_euler = ClassConditionalPipeline.from_pretrained(tmp_path, scheduler=EulerAncestralDiscreteScheduler(**TRAIN))
    assert type(with_euler.scheduler) is EulerAncestralDiscreteScheduler


def test_components_load_in_diffusers(saved):
    directory, theirs_unet = saved
    scheduler = diffusers.DDPMScheduler.from_pretrained(directory / "scheduler")
    assert scheduler.config.num_train_timesteps == TRAIN["num_train_timesteps"]
    assert scheduler.config.beta_schedule == TRAIN["beta_schedule"]
    ours = UNet2DModel.from_pretrained(directory / "unet")
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor(37), torch.tensor([1, 4])
    with torch.no_grad():
        assert_close(ours(x, t, class_labels=y).sample, theirs_unet(x, t, class_labels=y).sample, "unet")


def test_exported():
    assert fusediff.ClassConditionalPipeline is fusediff.pipelines.ClassConditionalPipeline is ClassConditionalPipeline
    assert "ClassConditionalPipeline" in dir(fusediff)


def test_loop_reads_nothing_back_from_the_device():
    """On the meta device any read of a value raises (see test_runtime.py); UNet2DModel's label check
    included, which asserts on the device instead of reading back."""
    pipe = _pipe(scheduler=EulerAncestralDiscreteScheduler(**TRAIN)).to("meta")
    out = pipe([0, 3], guidance_scale=2.0, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
               output_type="pt")
    assert out.images.device.type == "meta" and out.images.shape == (2, 2, 8, 8)


@pytest.mark.parametrize("labels, error, message", [
    ([4], ValueError, r"4 is the null \(unconditional\) class"),
    ([0, 7], ValueError, r"\[7\] are out of range: this model's classes are 0-3"),
    ([-1], ValueError, "out of range"),
    ([], ValueError, "empty"),
    (1.0, TypeError, "class_labels must be"),
    ([1, "2"], TypeError, "class_labels must be ints"),
    ([True], TypeError, "class_labels must be ints"),
    (torch.tensor([0.5]), TypeError, "integer tensor"),
])
def test_bad_labels(labels, error, message):
    with pytest.raises(error, match=message):
        _pipe()(labels, num_inference_steps=2)


def test_bad_arguments():
    pipe = _pipe()
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        pipe([0], guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe([0], num_inference_steps=0)
    with pytest.raises(ValueError, match="output_type"):
        pipe([0], num_inference_steps=2, output_type="latent")
    with pytest.raises(ValueError, match="generators"):
        pipe([0, 1], num_inference_steps=2, generator=[torch.Generator()])
    with pytest.raises(ValueError, match="latents have shape"):
        pipe([0, 1], num_inference_steps=2, latents=torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe([0], num_inference_steps=2, callback_on_step_end_tensor_inputs=["noise"])


def test_guidance_without_a_null_class():
    pipe = _pipe(null_class_label=None)
    with pytest.raises(ValueError, match="needs a null class"):
        pipe([0], guidance_scale=2.0, num_inference_steps=2)
    with pytest.raises(ValueError, match="needs a null class"):
        _pipe(null_class_label=None, guidance_scale=3.0)


@pytest.mark.parametrize("unet_options, message", [
    (dict(num_class_embeds=None), "no class embedding"),
    (dict(num_class_embeds=None, class_embed_type="timestep"), "class_embed_type='timestep'"),
])
def test_unet_without_a_class_table(unet_options, message):
    with pytest.raises(ValueError, match=message):
        ClassConditionalPipeline(unet=_unet(**unet_options), scheduler=DDIMScheduler(**TRAIN))


@pytest.mark.parametrize("null", [5, -6, 1.0, True])
def test_bad_null_class_label(null):
    with pytest.raises(ValueError, match="null_class_label must be None or an int"):
        _pipe(null_class_label=null)
