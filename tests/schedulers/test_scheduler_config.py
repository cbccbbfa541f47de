"""Scheduler configs: diffusers' constructor signatures and defaults, files that either library
loads from the other, swaps between compatible classes, frozen configs and loading errors."""

from __future__ import annotations

import inspect
import json
import logging

import diffusers
import numpy as np
import pytest
import torch

import fusediff
from fusediff.schedulers import DDIMScheduler, DDPMScheduler, PNDMScheduler, SchedulerMixin

PAIRS = [(DDPMScheduler, diffusers.DDPMScheduler), (DDIMScheduler, diffusers.DDIMScheduler),
         (PNDMScheduler, diffusers.PNDMScheduler)]
IDS = [ours.__name__ for ours, _ in PAIRS]
NON_DEFAULT = {  # every class takes these; each also gets its own below
    "num_train_timesteps": 500, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction", "timestep_spacing": "trailing", "steps_offset": 1,
}
OWN = {"DDPMScheduler": dict(variance_type="fixed_large", clip_sample=False, thresholding=True,
                             dynamic_thresholding_ratio=0.9, rescale_betas_zero_snr=True),
       "DDIMScheduler": dict(set_alpha_to_one=False, clip_sample_range=2.0, rescale_betas_zero_snr=True,
                             sample_max_value=3.0),
       "PNDMScheduler": dict(skip_prk_steps=True, set_alpha_to_one=True)}


def plain(config) -> dict:
    """A config without the bookkeeping keys the saving library adds, JSON-normalised."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def non_default(cls) -> dict:
    return {**NON_DEFAULT, **OWN[cls.__name__]}


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=IDS)
def test_signature_and_defaults_match_diffusers(ours, theirs):
    def params(cls):
        return [(p.name, p.default) for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    assert params(ours) == params(theirs)
    assert plain(ours().config) == plain(theirs().config)
    assert ours.config_name == theirs.config_name == "scheduler_config.json"
    assert ours.order == theirs.order and ours().init_noise_sigma == theirs().init_noise_sigma
    assert len(ours()) == len(theirs())


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=IDS)
def test_fusediff_file_loads_in_diffusers(tmp_path, ours, theirs):
    sched = ours(**non_default(ours))
    sched.save_pretrained(tmp_path / "scheduler")
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == ours.__name__ and "_diffusers_version" in saved
    loaded = theirs.from_pretrained(tmp_path / "scheduler")
    assert plain(loaded.config) == plain(sched.config)
    torch.testing.assert_close(loaded.alphas_cumprod, sched.alphas_cumprod, rtol=1e-6, atol=0)
    for s in (sched, loaded):
        s.set_timesteps(10)
    assert torch.equal(sched.timesteps, loaded.timesteps)


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=IDS)
def test_diffusers_file_loads_in_fusediff(tmp_path, ours, theirs):
    config = {**non_default(ours), "trained_betas": np.linspace(1e-4, 0.02, 500).tolist()}
    original = theirs(**config)
    original.save_pretrained(tmp_path / "model" / "scheduler")
    loaded = ours.from_pretrained(tmp_path / "model", subfolder="scheduler")
    assert plain(loaded.config) == plain(original.config)
    assert torch.equal(loaded.alphas_cumprod, original.alphas_cumprod)
    for s in (original, loaded):
        s.set_timesteps(10)
    assert torch.equal(loaded.timesteps, original.timesteps)
    # overrides replace values of the file
    again = ours.from_pretrained(tmp_path / "model", "scheduler", timestep_spacing="leading")
    assert again.config.timestep_spacing == "leading" and again.config.steps_offset == 1


@pytest.mark.parametrize("target", PAIRS, ids=IDS)
@pytest.mark.parametrize("source", PAIRS, ids=IDS)
def test_from_config_swaps_classes_like_diffusers(caplog, source, target):
    """Any of the three reads the others' configs without a warning and keeps their extra keys.

    Every argument is passed explicitly, as when a scheduler comes from a saved file: see
    test_swap_of_default_values below for the case where it is not.
    """
    explicit = {**plain(source[0]().config), **non_default(source[0])}
    ours_src, theirs_src = source[0](**explicit), source[1](**explicit)
    with caplog.at_level(logging.WARNING, logger="fusediff"):
        swapped = target[0].from_config(ours_src.config)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    reference = target[1].from_config(theirs_src.config)
    assert plain(swapped.config) == plain(reference.config)
    assert type(swapped) is target[0]


def test_swap_of_default_values():
    """diffusers drops the source's defaulted arguments on a swap: PNDM.from_config(DDIM().config) takes
    PNDM's own set_alpha_to_one=False, not DDIM's default True."""
    theirs = diffusers.PNDMScheduler.from_config(diffusers.DDIMScheduler().config)
    ours = PNDMScheduler.from_config(DDIMScheduler().config)
    assert ours.config.set_alpha_to_one == theirs.config.set_alpha_to_one


def test_unknown_keys_warn_and_are_kept(tmp_path, caplog):
    config = {**DDPMScheduler(variance_type="fixed_small_log").config, "karras_sigmas_for_later": True}
    with caplog.at_level(logging.WARNING, logger="fusediff"):
        sched = DDIMScheduler.from_config(config)
    assert "karras_sigmas_for_later" in caplog.text and "variance_type" not in caplog.text  # DDPM's key: quiet
    assert sched.config["karras_sigmas_for_later"] is True and sched.config["variance_type"] == "fixed_small_log"
    sched.save_pretrained(tmp_path)
    assert diffusers.DDIMScheduler.from_pretrained(tmp_path).config["karras_sigmas_for_later"] is True


def test_config_is_frozen():
    sched = DDIMScheduler()
    with pytest.raises(TypeError):
        sched.config["prediction_type"] = "v_prediction"
    with pytest.raises(TypeError):
        sched.config.prediction_type = "v_prediction"
    with pytest.raises(TypeError):
        del sched.config["prediction_type"]
    with pytest.raises(AttributeError):
        sched.config = {}
    assert sched.config.prediction_type == "epsilon"


def test_loading_errors(tmp_path):
    with pytest.raises(TypeError, match="no argument"):
        DDIMScheduler.from_config(DDIMScheduler().config, not_an_argument=1)
    with pytest.raises(FileNotFoundError):
        DDIMScheduler.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        DDIMScheduler.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="subfolder"):
        DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    with pytest.raises(TypeError, match="config mapping"):
        DDIMScheduler.from_config("scheduler_config.json")


def test_save_replaces_the_file_and_keeps_others(tmp_path):
    (tmp_path / "notes.txt").write_text("kept")
    DDIMScheduler(prediction_type="sample").save_pretrained(tmp_path)
    DDIMScheduler(prediction_type="v_prediction").save_pretrained(tmp_path)
    assert DDIMScheduler.from_pretrained(tmp_path).config.prediction_type == "v_prediction"
    assert (tmp_path / "notes.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "scheduler_config.json"]


ALL_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                  "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                  "DPMSolverMultistepScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler")


@pytest.mark.parametrize("name", ALL_SCHEDULERS)
def test_compatibles(name):
    """Every scheduler reads every other one's config, as diffusers' KarrasDiffusionSchedulers do."""
    cls = getattr(fusediff, name)
    assert set(cls._compatibles) == set(ALL_SCHEDULERS) - {name}
    assert {c.__name__ for c in cls().compatibles} == set(ALL_SCHEDULERS)
    assert issubclass(cls, SchedulerMixin)
    theirs = getattr(diffusers, name)
    assert {c.__name__ for c in theirs().compatibles} >= set(ALL_SCHEDULERS), "diffusers lists fewer"


def test_beta_tables_match_diffusers():
    """Every beta schedule (and its zero-SNR rescaling) gives diffusers' float32 tables."""
    for schedule in ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"):
        for rescale in (False, True):
            ours = DDPMScheduler(beta_schedule=schedule, rescale_betas_zero_snr=rescale)
            theirs = diffusers.DDPMScheduler(beta_schedule=schedule, rescale_betas_zero_snr=rescale)
            for name in ("betas", "alphas", "alphas_cumprod"):
                a, b = getattr(ours, name), getattr(theirs, name)
                assert a.dtype == b.dtype == torch.float32
                assert torch.equal(a, b), f"{schedule} rescale={rescale} {name}: max |diff| {(a - b).abs().max():.3e}"
