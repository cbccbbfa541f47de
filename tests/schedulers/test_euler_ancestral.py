"""fusediff's EulerAncestralDiscreteScheduler against diffusers' on whole seeded runs, its tables and errors.

Every step draws noise, so each parity run also checks that ours drew the same numbers from the
same generators (one, or one per batch element) as diffusers. Runs cover epsilon and v-prediction,
the three spacings with steps_offset, the beta schedules and zero-terminal-SNR betas; img2img runs
entered mid-schedule; float64 and float16 inputs. prediction_type="sample", which diffusers does not
implement, is checked against the update written out in float64.
"""

from __future__ import annotations

import math

import diffusers
import pytest
import torch
from schedulers.parity import FakeModel, gen, raises_in_both, start_sample
from schedulers.sigma_parity import (assert_configs_interchange, assert_from_config_like_diffusers,
                                     assert_signature_matches, assert_step_refusals, count_fused_calls, prepare,
                                     run_float64, run_half, run_img2img, run_sigma_parity)

from fusediff.schedulers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

CASES = {
    "default": {},
    "v-zero_snr-trailing": dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                timestep_spacing="trailing"),
    "scaled_linear-leading-offset": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         timestep_spacing="leading", steps_offset=1),
    "cosine-v": dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
}


@pytest.mark.parametrize("num_steps", [10, 25])
@pytest.mark.parametrize("name", list(CASES))
def test_parity_run(name, num_steps):
    ours, theirs = prepare(EulerAncestralDiscreteScheduler, CASES[name], num_steps)
    run_sigma_parity(ours, theirs, FakeModel(), noise_seed=3, what=f"Euler ancestral {name} {num_steps} steps")


def test_parity_one_generator_per_sample():
    ours, theirs = prepare(EulerAncestralDiscreteScheduler, CASES["v-zero_snr-trailing"], 10)
    run_sigma_parity(ours, theirs, FakeModel(), noise_seed=9, per_sample_generators=True,
                     what="Euler ancestral generator list")


@pytest.mark.parametrize("set_begin", [True, False], ids=["begin_index", "timestep_lookup"])
def test_img2img_start_mid_schedule(set_begin):
    run_img2img(EulerAncestralDiscreteScheduler, CASES["scaled_linear-leading-offset"], 12, 0.5, noise_seed=5,
                set_begin=set_begin, what="Euler ancestral img2img")


@pytest.mark.parametrize("name", ["default", "v-zero_snr-trailing"])
def test_float64_matches_diffusers_float64(name):
    run_float64(EulerAncestralDiscreteScheduler, CASES[name], 10, f"Euler ancestral float64 {name}", tol=1e-11,
                noise_seed=3)


def test_half_precision_within_diffusers_error():
    run_half(EulerAncestralDiscreteScheduler, CASES["cosine-v"], torch.float16, noise_seed=4)


def test_sample_prediction_against_float64_formula():
    """k-diffusion's ancestral step with x0 = m, written out in float64 (diffusers does not implement it)."""
    sched = EulerAncestralDiscreteScheduler(prediction_type="sample")
    sched.set_timesteps(8)
    sigmas = sched.sigmas.double().tolist()
    x, g_ours, g_ref = start_sample() * sigmas[0], gen(6), gen(6)
    for i, t in enumerate(sched.timesteps):
        m = FakeModel()(sched.scale_model_input(x, t), t)
        out = sched.step(m, t, x, generator=g_ours)
        s, s_next = sigmas[i], sigmas[i + 1]
        up = math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
        down = math.sqrt(s_next**2 - up**2)
        z = torch.randn(x.shape, generator=g_ref).double()
        ref = x.double() + (down - s) * (x.double() - m.double()) / s + up * z
        torch.testing.assert_close(out.prev_sample.double(), ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(out.pred_original_sample, m)
        x = out.prev_sample


def test_one_fused_call_per_step(monkeypatch):
    calls = count_fused_calls(monkeypatch)
    sched = EulerAncestralDiscreteScheduler()
    sched.set_timesteps(5)
    x = start_sample()
    for k, t in enumerate(sched.timesteps, start=1):
        x = sched.step(FakeModel()(x, t), t, x, generator=gen(0)).prev_sample
        assert calls[0] == k


def test_scale_model_input_and_add_noise_match():
    ours, (lo, _) = prepare(EulerAncestralDiscreteScheduler, CASES["scaled_linear-leading-offset"], 10)
    x0, noise, t = start_sample(seed=1), start_sample(seed=2), ours.timesteps[[0, 6]]
    assert float(ours.init_noise_sigma) == float(lo.init_noise_sigma)
    assert torch.equal(ours.add_noise(x0, noise, t), lo.add_noise(x0, noise, t))
    assert torch.equal(ours.scale_model_input(x0, t[1]), lo.scale_model_input(x0, t[1]))


def test_from_config_swaps_with_euler():
    euler = diffusers.EulerDiscreteScheduler(timestep_spacing="trailing", prediction_type="v_prediction",
                                             rescale_betas_zero_snr=True, use_karras_sigmas=True)
    _, back = assert_from_config_like_diffusers(EulerAncestralDiscreteScheduler, euler, 12,
                                                "Euler ancestral from an Euler config", EulerDiscreteScheduler)
    assert back.config.rescale_betas_zero_snr and back.config.timestep_spacing == "trailing"


def test_signature_defaults_and_initial_tables_match():
    assert_signature_matches(EulerAncestralDiscreteScheduler)


def test_saved_configs_load_in_both_libraries(tmp_path):
    assert_configs_interchange(tmp_path, EulerAncestralDiscreteScheduler, CASES["v-zero_snr-trailing"])


def test_other_seed_is_caught():
    """The comparison can fail: ours drawing from another seed than diffusers."""
    ours, theirs = prepare(EulerAncestralDiscreteScheduler, {}, 10)
    with pytest.raises(AssertionError, match="not close"):
        run_sigma_parity(ours, theirs, FakeModel(), noise_seed=3, our_kwargs=dict(generator=gen(4)))


# -- errors ------------------------------------------------------------------------------------
both_raise = raises_in_both(EulerAncestralDiscreteScheduler)


def test_errors_shared_with_diffusers():
    x = start_sample()
    both_raise(NotImplementedError, lambda c: c(beta_schedule="sigmoid"))
    both_raise(ValueError, lambda c: c(timestep_spacing="uniform").set_timesteps(10))
    both_raise(ValueError, lambda c: c().step(x, 999, x))  # an integer: an index, not a timestep
    both_raise(ValueError, lambda c: c(prediction_type="flow").step(x, 999.0, x))
    both_raise(TypeError, lambda c: c().set_timesteps(10, timesteps=[999, 500]))  # no custom schedules


def test_errors_where_diffusers_fails_obscurely():
    sched = assert_step_refusals(EulerAncestralDiscreteScheduler, 4, 998.0)
    with pytest.raises(TypeError, match="integer"):
        sched.set_timesteps(2.5)
    with pytest.raises(ValueError, match="at least 1"):
        sched.set_timesteps(0)
