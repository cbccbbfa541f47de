"""fusediff's HeunDiscreteScheduler against diffusers' on whole runs (both stages), its tables and errors.

Parity runs cover the three prediction types, karras and exponential sigmas, clip_sample, the four
beta schedules (exp included), the spacings with steps_offset, custom timesteps and a
num_train_timesteps override; img2img runs entered mid-schedule; float64 and float16 inputs; the
stage sequence (state_in_first_order) and one fused op per model call.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from schedulers.parity import FakeModel, raises_in_both, start_sample
from schedulers.sigma_parity import (assert_configs_interchange, assert_from_config_like_diffusers,
                                     assert_signature_matches, assert_step_refusals, assert_unsupported_options_refused,
                                     count_fused_calls, prepare, run_float64, run_half, run_img2img, run_sigma_parity)

from fusediff.schedulers import EulerDiscreteScheduler, HeunDiscreteScheduler

CASES = {
    "default": {},
    "v-karras-clip": dict(prediction_type="v_prediction", use_karras_sigmas=True, clip_sample=True,
                          clip_sample_range=1.5),
    "sample-exponential-trailing": dict(prediction_type="sample", use_exponential_sigmas=True,
                                        timestep_spacing="trailing"),
    "exp_betas-leading-offset": dict(beta_schedule="exp", timestep_spacing="leading", steps_offset=1),
    "cosine-v": dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
    "scaled_linear-clip-epsilon": dict(beta_schedule="scaled_linear", clip_sample=True),
}


@pytest.mark.parametrize("num_steps", [6, 20])
@pytest.mark.parametrize("name", list(CASES))
def test_parity_run(name, num_steps):
    ours, theirs = prepare(HeunDiscreteScheduler, CASES[name], num_steps)
    assert len(ours.timesteps) == 2 * num_steps - 1
    run_sigma_parity(ours, theirs, FakeModel(), what=f"Heun {name} {num_steps} steps")


@pytest.mark.parametrize("kwargs", [dict(timesteps=[999, 700, 421.5, 200, 50]),
                                    dict(num_train_timesteps=800)], ids=["custom_timesteps", "num_train_override"])
def test_parity_other_schedules(kwargs):
    num_steps = None if "timesteps" in kwargs else 8
    ours, theirs = prepare(HeunDiscreteScheduler, dict(prediction_type="v_prediction"), num_steps, **kwargs)
    run_sigma_parity(ours, theirs, FakeModel(), what=f"Heun {list(kwargs)}")


@pytest.mark.parametrize("set_begin", [True, False], ids=["begin_index", "timestep_lookup"])
def test_img2img_start_mid_schedule(set_begin):
    run_img2img(HeunDiscreteScheduler, CASES["v-karras-clip"], 10, 0.7, set_begin=set_begin, what="Heun img2img")


@pytest.mark.parametrize("name", ["default", "v-karras-clip"])
def test_float64_matches_diffusers_float64(name):
    run_float64(HeunDiscreteScheduler, CASES[name], 8, f"Heun float64 {name}", tol=1e-11)


def test_half_precision_within_diffusers_error():
    run_half(HeunDiscreteScheduler, CASES["v-karras-clip"], torch.float16)


def test_stages_alternate_as_diffusers(monkeypatch):
    """First and second stages alternate; the last call is a first stage to sigma = 0; one fused op per call."""
    calls = count_fused_calls(monkeypatch)
    ours, (lo, _) = prepare(HeunDiscreteScheduler, {}, 5)
    x = start_sample() * float(ours.init_noise_sigma)
    for k, t in enumerate(ours.timesteps):
        assert ours.state_in_first_order == lo.state_in_first_order == (k % 2 == 0)
        m = FakeModel()(ours.scale_model_input(x, t), t)
        lo.scale_model_input(x, t)
        lo.step(m, t, x)
        x = ours.step(m, t, x).prev_sample
        assert calls[0] == k + 1
    assert not ours.state_in_first_order and ours.sigmas[-1] == 0  # the final Euler step leaves a stage due
    ours.set_timesteps(5)
    assert ours.state_in_first_order and ours.sample is None


def test_scale_model_input_and_add_noise_match():
    ours, (lo, _) = prepare(HeunDiscreteScheduler, CASES["v-karras-clip"], 10)
    x0, noise, t = start_sample(seed=1), start_sample(seed=2), ours.timesteps[[3, 8]]
    assert float(ours.init_noise_sigma) == float(lo.init_noise_sigma)
    assert torch.equal(ours.add_noise(x0, noise, t), lo.add_noise(x0, noise, t))
    for s in (ours, lo):
        s.set_begin_index(6)
    assert torch.equal(ours.scale_model_input(x0, t[1]), lo.scale_model_input(x0, t[1]))
    assert torch.equal(ours.add_noise(x0, noise, t), lo.add_noise(x0, noise, t))


def test_from_config_swaps_with_euler():
    euler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                             use_karras_sigmas=True, prediction_type="v_prediction")
    _, back = assert_from_config_like_diffusers(HeunDiscreteScheduler, euler, 9, "Heun from an Euler config",
                                                EulerDiscreteScheduler)
    assert back.config.use_karras_sigmas and back.config.beta_schedule == "scaled_linear"


def test_signature_defaults_and_initial_tables_match():
    assert_signature_matches(HeunDiscreteScheduler)


def test_saved_configs_load_in_both_libraries(tmp_path):
    assert_configs_interchange(tmp_path, HeunDiscreteScheduler, CASES["v-karras-clip"])


def test_first_order_only_is_caught(monkeypatch):
    """The comparison can fail: a Heun whose second stage repeats the Euler predictor."""
    import fusediff.kernels.scheduler_step_coeffs as sc

    real = sc.heun
    monkeypatch.setattr(sc, "heun", lambda *a, second_stage=False, **k: real(*a, **k))
    ours, theirs = prepare(HeunDiscreteScheduler, {}, 6)
    with pytest.raises(AssertionError, match="not close"):
        run_sigma_parity(ours, theirs, FakeModel(), what="Heun without its corrector")


# -- errors ------------------------------------------------------------------------------------
both_raise = raises_in_both(HeunDiscreteScheduler)


def test_errors_shared_with_diffusers():
    both_raise(NotImplementedError, lambda c: c(beta_schedule="sigmoid"))
    both_raise(ValueError, lambda c: c(use_karras_sigmas=True, use_exponential_sigmas=True))
    both_raise(ValueError, lambda c: c(timestep_spacing="uniform"))
    both_raise(ValueError, lambda c: c().set_timesteps())
    both_raise(ValueError, lambda c: c().set_timesteps(10, timesteps=[900, 100]))
    both_raise(ValueError, lambda c: c(use_karras_sigmas=True).set_timesteps(timesteps=[900, 100]))


def test_errors_where_diffusers_fails_obscurely():
    sched = assert_step_refusals(HeunDiscreteScheduler, 3, 998.0)
    assert_unsupported_options_refused(HeunDiscreteScheduler)
    with pytest.raises(ValueError, match="finite"):
        sched.set_timesteps(timesteps=[900, float("nan")])
