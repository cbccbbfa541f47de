"""fusediff's EulerDiscreteScheduler against diffusers' on whole runs, its tables, dtypes and errors.

Parity runs (sigma_parity.py) cover the three prediction types, karras and exponential sigmas (with
and without sigma_min/sigma_max), log_linear interpolation, the spacings with steps_offset, final
sigma zero and sigma_min, zero-terminal-SNR betas with continuous timesteps, custom timesteps and
sigmas, and churn with seeded generators (one, or one per batch element); img2img runs entered
mid-schedule with and without set_begin_index; float64 and half-precision inputs.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from support.tolerance import assert_within_ref_error
from schedulers.parity import FakeModel, gen, raises_in_both, start_sample
from schedulers.sigma_parity import (assert_configs_interchange, assert_from_config_like_diffusers,
                                     assert_signature_matches, assert_step_refusals, assert_unsupported_options_refused,
                                     count_fused_calls, float64_upcast, prepare, run_float64, run_half, run_img2img,
                                     run_sigma_parity, same_tables)

from fusediff.kernels import use_backend
from fusediff.schedulers import DDIMScheduler, EulerDiscreteScheduler, SchedulerOutput

CHURN = dict(s_churn=3.0, s_tmin=0.3, s_tmax=20.0, s_noise=0.95)  # churns the middle of the run only
# (config, step arguments)
CASES = {
    "default": ({}, {}),
    "v-karras-churn": (dict(prediction_type="v_prediction", use_karras_sigmas=True), CHURN),
    "sample-exponential-leading-offset": (dict(prediction_type="sample", use_exponential_sigmas=True,
                                               timestep_spacing="leading", steps_offset=1), {}),
    "log_linear-sigma_min-trailing": (dict(interpolation_type="log_linear", final_sigmas_type="sigma_min",
                                           timestep_spacing="trailing"), {}),
    "zero_snr-v-continuous-trailing": (dict(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                            timestep_type="continuous", timestep_spacing="trailing"), {}),
    "karras-bounds-scaled_linear-churn": (dict(use_karras_sigmas=True, sigma_min=0.05, sigma_max=12.0,
                                               beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
                                          dict(s_churn=1.0)),
    "cosine-churn-everywhere": (dict(beta_schedule="squaredcos_cap_v2"), dict(s_churn=40.0)),
}


def seed_of(kwargs) -> int | None:
    return 3 if kwargs.get("s_churn", 0) > 0 else None


@pytest.mark.parametrize("num_steps", [10, 25])
@pytest.mark.parametrize("name", list(CASES))
def test_parity_run(name, num_steps):
    config, kwargs = CASES[name]
    ours, theirs = prepare(EulerDiscreteScheduler, config, num_steps)
    run_sigma_parity(ours, theirs, FakeModel(), step_kwargs=kwargs, noise_seed=seed_of(kwargs),
                     what=f"Euler {name} {num_steps} steps")


def test_parity_one_generator_per_sample():
    ours, theirs = prepare(EulerDiscreteScheduler, dict(use_karras_sigmas=True), 10)
    run_sigma_parity(ours, theirs, FakeModel(), step_kwargs=CHURN, noise_seed=9, per_sample_generators=True,
                     what="Euler generator list")


@pytest.mark.parametrize("given", [dict(timesteps=[999, 800, 650.5, 400, 120, 3]),
                                   dict(sigmas=[60.0, 14.6, 3.1, 1.0, 0.2, 0.0])], ids=["timesteps", "sigmas"])
def test_parity_custom_schedule(given):
    ours, theirs = prepare(EulerDiscreteScheduler, dict(prediction_type="v_prediction"), **given)
    assert ours.num_inference_steps == theirs[0].num_inference_steps == 6 - ("sigmas" in given)
    run_sigma_parity(ours, theirs, FakeModel(), what=f"Euler custom {list(given)}")


@pytest.mark.parametrize("set_begin", [True, False], ids=["begin_index", "timestep_lookup"])
@pytest.mark.parametrize("name", ["default", "v-karras-churn"])
def test_img2img_start_mid_schedule(name, set_begin):
    config, kwargs = CASES[name]
    run_img2img(EulerDiscreteScheduler, config, 12, 0.6, step_kwargs=kwargs, noise_seed=seed_of(kwargs),
                set_begin=set_begin, what=f"Euler img2img {name}")


@pytest.mark.parametrize("name", ["default", "v-karras-churn", "zero_snr-v-continuous-trailing"])
def test_float64_matches_diffusers_float64(name):
    config, kwargs = CASES[name]
    last = run_float64(EulerDiscreteScheduler, config, 10, f"Euler float64 {name}", tol=1e-11, step_kwargs=kwargs,
                       noise_seed=seed_of(kwargs))
    assert last[0].prev_sample.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_diffusers_error(dtype):
    run_half(EulerDiscreteScheduler, dict(use_karras_sigmas=True), dtype, step_kwargs=CHURN, noise_seed=4)


def test_mixed_dtypes_follow_diffusers():
    """A float16 model output on a float32 sample: diffusers returns prev_sample in float16 and x0 in float32
    (it rounds sigma*m to float16 on the way, so it is held to the house rule against float64)."""
    ours, (lo, exact) = prepare(EulerDiscreteScheduler, {}, 10)
    x, t = start_sample() * 10, ours.timesteps[3]
    m = FakeModel(dtype=torch.float16)(x, t)
    for s in (ours, lo, exact):
        s.set_begin_index(3)
    mine, theirs = ours.step(m, t, x), lo.step(m, t, x)
    with float64_upcast(exact):
        ref = exact.step(m.double(), t, x.double())
    assert mine.prev_sample.dtype == theirs.prev_sample.dtype == torch.float16
    assert mine.pred_original_sample.dtype == theirs.pred_original_sample.dtype == torch.float32
    for field in ("prev_sample", "pred_original_sample"):
        assert_within_ref_error(getattr(mine, field), getattr(theirs, field), getattr(ref, field), field)


def test_outputs_and_one_fused_call_per_step(monkeypatch):
    calls = count_fused_calls(monkeypatch)
    ours = EulerDiscreteScheduler()
    ours.set_timesteps(10)
    x, t = start_sample(), ours.timesteps[4]
    out = ours.step(FakeModel()(x, t), t, x, s_churn=5.0, generator=gen(0))
    assert isinstance(out, SchedulerOutput) and calls[0] == 1 and ours.step_index == 5
    prev, x0 = ours.step(FakeModel()(x, ours.timesteps[5]), ours.timesteps[5], x, return_dict=False)
    assert calls[0] == 2 and prev.shape == x0.shape == x.shape


def test_reference_backend_agrees():
    runs = []
    for backend in ("fused", "ref"):
        with use_backend(backend):
            ours = EulerDiscreteScheduler(prediction_type="v_prediction", use_karras_sigmas=True)
            ours.set_timesteps(10)
            x, g = start_sample() * float(ours.init_noise_sigma), gen(2)
            for t in ours.timesteps:
                x = ours.step(FakeModel()(ours.scale_model_input(x, t), t), t, x, generator=g, **CHURN).prev_sample
            runs.append(x)
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_scale_model_input_and_add_noise_match(spacing):
    """Training (timestep lookup), img2img (begin index) and inpainting (after a step) noising, as diffusers."""
    ours, (lo, _) = prepare(EulerDiscreteScheduler, dict(timestep_spacing=spacing), 10)
    x0, noise = start_sample(seed=1), start_sample(seed=2)
    assert float(ours.init_noise_sigma) == float(lo.init_noise_sigma)
    t = ours.timesteps[[1, 7]]
    torch.testing.assert_close(ours.add_noise(x0, noise, t), lo.add_noise(x0, noise, t), rtol=0, atol=0)
    for s in (ours, lo):
        s.set_begin_index(4)
    torch.testing.assert_close(ours.add_noise(x0, noise, t), lo.add_noise(x0, noise, t), rtol=0, atol=0)
    t4 = ours.timesteps[4]
    assert torch.equal(ours.scale_model_input(x0, t4), lo.scale_model_input(x0, t4))
    for s in (ours, lo):
        s.step(noise, t4, x0)
    torch.testing.assert_close(ours.add_noise(x0, noise, t), lo.add_noise(x0, noise, t), rtol=0, atol=0)
    fresh, fresh_lo = EulerDiscreteScheduler(), diffusers.EulerDiscreteScheduler()  # before set_timesteps
    ti = torch.tensor([999, 500, 0])
    torch.testing.assert_close(fresh.add_noise(x0[:1].repeat(3, 1, 1, 1), noise[:1].repeat(3, 1, 1, 1), ti),
                               fresh_lo.add_noise(x0[:1].repeat(3, 1, 1, 1), noise[:1].repeat(3, 1, 1, 1), ti))


SPACINGS = st.sampled_from(["linspace", "leading", "trailing"])


@given(T=st.sampled_from([1000, 999, 64]), n=st.integers(1, 70), spacing=SPACINGS, offset=st.integers(0, 2),
       sigmas=st.sampled_from(["plain", "karras", "exponential"]),
       interpolation=st.sampled_from(["linear", "log_linear"]), final=st.sampled_from(["zero", "sigma_min"]))
def test_timesteps_and_sigmas_match(T, n, spacing, offset, sigmas, interpolation, final):
    n = min(n, T)
    config = dict(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset,
                  interpolation_type=interpolation, final_sigmas_type=final, use_karras_sigmas=sigmas == "karras",
                  use_exponential_sigmas=sigmas == "exponential")
    ours, theirs = EulerDiscreteScheduler(**config), diffusers.EulerDiscreteScheduler(**config)
    for s in (ours, theirs):
        s.set_timesteps(n)
    same_tables(ours, theirs, str(config))


def test_from_config_swaps_with_ddim():
    ddim = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   timestep_spacing="trailing", prediction_type="v_prediction")
    ours, back = assert_from_config_like_diffusers(EulerDiscreteScheduler, ddim, 15, "Euler from a DDIM config",
                                                   DDIMScheduler, all_keys=True)
    assert back.config.prediction_type == "v_prediction" and back.config.timestep_spacing == "trailing"
    torch.testing.assert_close(back.alphas_cumprod, ours.alphas_cumprod, rtol=0, atol=0)


def test_signature_defaults_and_initial_tables_match():
    assert_signature_matches(EulerDiscreteScheduler)


@pytest.mark.parametrize("config", [dict(use_karras_sigmas=True, sigma_min=0.1, prediction_type="v_prediction",
                                         timestep_type="continuous", final_sigmas_type="sigma_min"),
                                    dict(rescale_betas_zero_snr=True, interpolation_type="log_linear",
                                         trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist())])
def test_saved_configs_load_in_both_libraries(tmp_path, config):
    assert_configs_interchange(tmp_path, EulerDiscreteScheduler, config)


def test_mismatched_settings_are_caught():
    """The comparison can fail: another prediction type, or another churn noise scale, than diffusers'."""
    ours, _ = prepare(EulerDiscreteScheduler, dict(prediction_type="v_prediction"), 10)
    _, theirs = prepare(EulerDiscreteScheduler, {}, 10)
    with pytest.raises(AssertionError, match="not close"):
        run_sigma_parity(ours, theirs, FakeModel(), what="v against epsilon")
    ours, theirs = prepare(EulerDiscreteScheduler, {}, 10)
    with pytest.raises(AssertionError, match="not close"):
        run_sigma_parity(ours, theirs, FakeModel(), step_kwargs=CHURN, our_kwargs=dict(s_noise=1.0), noise_seed=3,
                         what="s_noise 1.0 against 0.95")


# -- errors ------------------------------------------------------------------------------------
both_raise = raises_in_both(EulerDiscreteScheduler)


def test_errors_shared_with_diffusers():
    x = start_sample()
    both_raise(NotImplementedError, lambda c: c(beta_schedule="sigmoid"))
    both_raise(ValueError, lambda c: c(use_karras_sigmas=True, use_exponential_sigmas=True))
    both_raise(ValueError, lambda c: c(timestep_spacing="uniform").set_timesteps(10))
    both_raise(ValueError, lambda c: c(interpolation_type="cubic").set_timesteps(10))
    both_raise(ValueError, lambda c: c(final_sigmas_type="one").set_timesteps(10))
    both_raise(ValueError, lambda c: c().set_timesteps())
    both_raise(ValueError, lambda c: c().set_timesteps(10, timesteps=[900, 100]))
    both_raise(ValueError, lambda c: c().set_timesteps(timesteps=[900, 100], sigmas=[3.0, 1.0, 0.0]))
    both_raise(ValueError, lambda c: c(use_karras_sigmas=True).set_timesteps(timesteps=[900, 100]))
    both_raise(ValueError, lambda c: c(prediction_type="v_prediction", timestep_type="continuous").set_timesteps(
        timesteps=[900, 100]))
    both_raise(ValueError, lambda c: c().step(x, 999, x))  # an integer: an index, not a timestep
    both_raise(ValueError, lambda c: c().step(x, torch.tensor(999), x))


def test_errors_where_diffusers_fails_obscurely():
    x = start_sample()
    sched = assert_step_refusals(EulerDiscreteScheduler, 10, 998.5)
    assert_unsupported_options_refused(EulerDiscreteScheduler)
    with pytest.raises(ValueError, match="exceeds"):
        EulerDiscreteScheduler(timestep_spacing="leading").set_timesteps(1001)
    with pytest.raises(ValueError, match="begin_index"):
        sched.set_begin_index(-1)
    sched.set_begin_index(10)  # no step left (an img2img strength of 0): accepted, and step refuses
    sched.set_timesteps(10)
    sched.set_begin_index(10)
    with pytest.raises(ValueError, match="has ended"):
        sched.step(x, sched.timesteps[-1], x)
    with pytest.raises(ValueError, match="needs its timestep"):
        EulerDiscreteScheduler().scale_model_input(x)
    with pytest.raises(ValueError, match="shape"):
        EulerDiscreteScheduler().step(x, 999.0, x[:1])
