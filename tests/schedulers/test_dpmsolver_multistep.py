"""fusediff's DPMSolverMultistepScheduler against diffusers' on whole runs, its configs, and its errors.

Parity runs (multistep_parity.run_parity: every step's sample and x0/eps history against diffusers'
float32 run and its float64 twin) cover DPM-Solver++ 1M/2M/3M, midpoint and heun, the three prediction
types and spacings, Karras, exponential and uniform-lambda sigmas, lambda_min_clipped, lower_order_final
on and off, euler_at_final, both final sigma types, thresholding, learned variances, zero-SNR betas, the
noise-prediction algorithms, and the SDE variants with seeded noise; float64 inputs are held to float64
accuracy. The third-order sde-dpmsolver++ step, where diffusers' D2 weight is off by alpha_t, is
checked against diffusers plus that term.
"""

from __future__ import annotations

import math

import diffusers
import pytest
import torch
from schedulers.multistep_parity import (assert_errors_shared_with_diffusers, assert_from_config_like_diffusers,
                                         assert_round_trip_both_ways, assert_same_schedule,
                                         assert_signature_and_defaults_match, assert_step_errors, in_float64,
                                         prepare, run_float64, run_from_begin_index, run_half, run_parity, set_all)
from schedulers.parity import FakeModel, gen, raises_in_both, ready, start_sample

from fusediff.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from fusediff.schedulers.scheduling_base import SchedulerOutput

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*algorithm_types dpmsolver and sde-dpmsolver:FutureWarning")]
THEIRS = diffusers.DPMSolverMultistepScheduler

# name: (config, num_inference_steps, noise seed or None)
CASES = {
    "2M-default": ({}, 10, None),
    "2M-25-steps": ({}, 25, None),
    "1M-leading-offset": (dict(solver_order=1, timestep_spacing="leading", steps_offset=1), 10, None),
    "3M-lower_order_final": (dict(solver_order=3), 10, None),
    "3M-no-lower_order_final-sigma_min": (dict(solver_order=3, lower_order_final=False,
                                               final_sigmas_type="sigma_min"), 6, None),
    "2M-heun-karras-scaled_linear": (dict(solver_type="heun", use_karras_sigmas=True,
                                          beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), 20, None),
    "3M-karras-sigma_min-short": (dict(solver_order=3, use_karras_sigmas=True, final_sigmas_type="sigma_min"), 5,
                                  None),
    "3M-v-trailing-zero_snr": (dict(solver_order=3, prediction_type="v_prediction", timestep_spacing="trailing",
                                    rescale_betas_zero_snr=True), 10, None),
    "2M-sample-threshold": (dict(prediction_type="sample", thresholding=True, sample_max_value=1.5), 10, None),
    "3M-eps-threshold": (dict(solver_order=3, thresholding=True, sample_max_value=2.0, lower_order_final=False,
                              final_sigmas_type="sigma_min"), 8, None),
    "2M-exponential-linspace": (dict(use_exponential_sigmas=True), 12, None),
    "2M-lu-cosine-clipped": (dict(use_lu_lambdas=True, beta_schedule="squaredcos_cap_v2",
                                  lambda_min_clipped=-5.1), 10, None),
    "3M-karras-cosine-clipped": (dict(solver_order=3, use_karras_sigmas=True, beta_schedule="squaredcos_cap_v2",
                                      lambda_min_clipped=-5.1), 10, None),
    "2M-euler_at_final-sigma_min": (dict(euler_at_final=True, final_sigmas_type="sigma_min"), 20, None),
    "sde++-2M-midpoint": (dict(algorithm_type="sde-dpmsolver++"), 10, 3),
    "sde++-2M-heun-karras": (dict(algorithm_type="sde-dpmsolver++", solver_type="heun", use_karras_sigmas=True),
                             15, 4),
    "sde++-1M-v": (dict(algorithm_type="sde-dpmsolver++", solver_order=1, prediction_type="v_prediction"), 8, 5),
    "dpmsolver-3-sigma_min": (dict(algorithm_type="dpmsolver", solver_order=3, final_sigmas_type="sigma_min"),
                              10, None),
    "dpmsolver-2-heun-sample-threshold": (dict(algorithm_type="dpmsolver", solver_type="heun",
                                               prediction_type="sample", thresholding=True,
                                               final_sigmas_type="sigma_min"), 10, None),
    "sde-dpmsolver-2-midpoint": (dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"), 10, 6),
}


@pytest.mark.parametrize("name", list(CASES))
def test_parity_run(name):
    config, n, seed = CASES[name]
    ours, (lo, exact) = prepare(DPMSolverMultistepScheduler, config, n)
    assert_same_schedule(ours, lo)
    if len(set(ours.timesteps.tolist())) < n:  # repeated timesteps (cosine + karras): start at index 0
        for s in (ours, lo, exact):
            s.set_begin_index(0)
    run_parity(ours, (lo, exact), noise_seed=seed, what=f"DPM {name}")


def test_learned_variance_channels_are_dropped():
    ours, theirs = prepare(DPMSolverMultistepScheduler, dict(variance_type="learned_range"), 10)
    run_parity(ours, theirs, FakeModel(variance="learned_range"), what="DPM learned variance")


@pytest.mark.parametrize("name", ["3M-v-trailing-zero_snr", "dpmsolver-2-heun-sample-threshold", "sde++-2M-midpoint"])
def test_float64_inputs_to_float64_accuracy(name):
    config, n, seed = CASES[name]
    ours, theirs = prepare(DPMSolverMultistepScheduler, config, n)
    run_float64(ours, theirs, f"DPM float64 {name}", noise_seed=seed)


def test_sde_third_order_is_diffusers_plus_its_missing_term():
    """diffusers' third-order sde-dpmsolver++ weighs D2 by alpha_t((1 - e^-2h - 2h)/(2h)^2 - 1/2); the integral
    of the SDE's quadratic term is that + alpha_t. Ours must equal diffusers' (float64 twin) + alpha_t D2."""
    config = dict(algorithm_type="sde-dpmsolver++", solver_order=3, lower_order_final=False)
    ours, exact = DPMSolverMultistepScheduler(**config), THEIRS(**config)
    set_all((ours, exact), 20)
    x, g_ours, g_theirs = start_sample(dtype=torch.float64), gen(8), gen(8)
    for i, t in enumerate(ours.timesteps[:4]):
        m = FakeModel(dtype=torch.float64)(x, t)
        mine = ours.step(m, t, x, generator=g_ours).prev_sample
        with in_float64(exact):
            ref = exact.step(m, t, x, generator=g_theirs).prev_sample
        expected = ref
        if i >= 2:  # third order: add alpha_t * D2 from diffusers' own history
            lam = [-math.log(float(exact.sigmas[i - j])) for j in range(3)]
            h = -math.log(float(exact.sigmas[i + 1])) - lam[0]
            r0, r1 = (lam[0] - lam[1]) / h, (lam[1] - lam[2]) / h
            m0, m1, m2 = exact.model_outputs[-1], exact.model_outputs[-2], exact.model_outputs[-3]
            d2 = ((m0 - m1) / r0 - (m1 - m2) / r1) / (r0 + r1)
            alpha_t = 1 / math.sqrt(float(exact.sigmas[i + 1]) ** 2 + 1)
            expected = ref + alpha_t * d2
            assert (mine - ref).abs().max() > 1e-3, "the third-order SDE step should differ from diffusers'"
        torch.testing.assert_close(mine, expected, rtol=1e-10, atol=1e-10, msg=f"step {i}")
        x = mine


def test_zero_length_last_step_is_finite():
    """Karras levels end at the trained sigma_min, which is also the final level: the last step has h = 0.
    A third-order step there is 0/0 in diffusers (NaN); its limit h -> 0 is x itself."""
    config = dict(solver_order=3, use_karras_sigmas=True, final_sigmas_type="sigma_min", lower_order_final=False)
    ours, lo = DPMSolverMultistepScheduler(**config), THEIRS(**config)
    set_all((ours, lo), 5)
    assert ours.sigmas[-1] == ours.sigmas[-2]
    x = start_sample()
    for t in ours.timesteps:
        m = FakeModel()(x, t)
        mine, theirs = ours.step(m, t, x).prev_sample, lo.step(m, t, x).prev_sample
        if t == ours.timesteps[-1]:
            assert torch.isnan(theirs).all() and torch.equal(mine, x)
        x = mine


def test_mid_schedule_start_with_begin_index():
    ours, (lo, exact) = prepare(DPMSolverMultistepScheduler, dict(solver_order=3), 20)
    run_from_begin_index(ours, (lo, exact), 8, what="DPM begin_index 8")
    assert ours.step_index == lo.step_index == 20


def test_mid_schedule_start_by_timestep_and_add_noise():
    ours, (lo, exact) = prepare(DPMSolverMultistepScheduler, {}, 15)
    t = ours.timesteps[[3, 3, 9]]
    x0, noise = start_sample(shape=(3, 2, 5, 4), seed=1), start_sample(shape=(3, 2, 5, 4), seed=2)
    torch.testing.assert_close(ours.add_noise(x0, noise, t), lo.add_noise(x0, noise, t), rtol=1e-6, atol=1e-7)
    run_parity(ours, (lo, exact), timesteps=ours.timesteps[5:], what="DPM start at index 5")


def test_mixed_dtypes_promote_like_diffusers():
    """A float16 model output on a float32 sample: float32 results (check() asserts the dtype)."""
    ours, theirs = prepare(DPMSolverMultistepScheduler, dict(solver_order=3), 10)
    run_parity(ours, theirs, FakeModel(dtype=torch.float16), what="DPM float16 model output")


def test_outputs_tuple_and_step_index():
    sched = DPMSolverMultistepScheduler()
    sched.set_timesteps(5)
    x = start_sample()
    out = sched.step(FakeModel()(x, sched.timesteps[0]), sched.timesteps[0], x)
    assert isinstance(out, SchedulerOutput) and out.prev_sample.shape == x.shape and sched.step_index == 1
    (prev,) = sched.step(FakeModel()(x, sched.timesteps[1]), sched.timesteps[1], x, return_dict=False)
    assert prev.shape == x.shape and sched.lower_order_nums == 2
    assert sched.scale_model_input(x, 3) is x and len(sched) == 1000


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_diffusers_error(dtype):
    """Half-precision samples: ours within twice diffusers' own error (+ the dtype's atol) of the float64 twin."""
    run_half(*prepare(DPMSolverMultistepScheduler, dict(solver_order=3), 10), dtype)


# -- configs -----------------------------------------------------------------------------------
def test_signature_and_defaults_match_diffusers():
    assert_signature_and_defaults_match(DPMSolverMultistepScheduler)
    assert DPMSolverMultistepScheduler.order == THEIRS.order


NON_DEFAULT = dict(num_train_timesteps=500, beta_schedule="scaled_linear", solver_order=3,
                   prediction_type="v_prediction",
                   thresholding=True, sample_max_value=2.0, solver_type="heun", lower_order_final=False,
                   use_karras_sigmas=True, final_sigmas_type="sigma_min", lambda_min_clipped=-6.0,
                   timestep_spacing="trailing", rescale_betas_zero_snr=True)


def test_save_load_round_trip_both_ways(tmp_path):
    assert_round_trip_both_ways(tmp_path, DPMSolverMultistepScheduler, NON_DEFAULT)
    # the default lambda_min_clipped (-inf) survives JSON in both directions
    DPMSolverMultistepScheduler().save_pretrained(tmp_path / "c")
    assert THEIRS.from_pretrained(tmp_path / "c").config.lambda_min_clipped == -math.inf
    THEIRS().save_pretrained(tmp_path / "d")
    assert DPMSolverMultistepScheduler.from_pretrained(tmp_path / "d").config.lambda_min_clipped == -math.inf


@pytest.mark.parametrize("source", ["DDIMScheduler", "EulerDiscreteScheduler", "DEISMultistepScheduler",
                                    "UniPCMultistepScheduler"])
def test_from_config_of_other_schedulers_like_diffusers(source):
    config = getattr(diffusers, source)(beta_schedule="scaled_linear", timestep_spacing="trailing").config
    assert_from_config_like_diffusers(DPMSolverMultistepScheduler, config)


def test_swap_back_to_ddim_in_both_libraries():
    from fusediff.schedulers import DDIMScheduler
    dpm = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    for cls in (DDIMScheduler, diffusers.DDIMScheduler):
        ddim = cls.from_config(dpm.config)
        assert ddim.config.beta_schedule == "scaled_linear" and ddim.config.prediction_type == "v_prediction"


# -- errors ------------------------------------------------------------------------------------
both_raise = raises_in_both(DPMSolverMultistepScheduler)


def test_errors_shared_with_diffusers():
    x = start_sample()
    assert_errors_shared_with_diffusers(both_raise)
    both_raise(NotImplementedError, lambda c: c(algorithm_type="ddim"))
    both_raise(ValueError, lambda c: c(algorithm_type="dpmsolver"))  # final sigma 0 with eps
    both_raise(ValueError, lambda c: c(final_sigmas_type="one").set_timesteps(10))
    both_raise(ValueError, lambda c: c().set_timesteps())
    both_raise(ValueError, lambda c: c().set_timesteps(10, timesteps=[999, 500, 1]))
    both_raise(ValueError, lambda c: c(use_karras_sigmas=True).set_timesteps(timesteps=[999, 500, 1]))
    both_raise(ValueError, lambda c: ready(c, prediction_type="flow").step(x, 999, x))


def test_errors_where_diffusers_fails_silently_or_obscurely():
    x = start_sample()
    assert_step_errors(DPMSolverMultistepScheduler)
    with pytest.raises(ValueError, match="solver_order"):
        DPMSolverMultistepScheduler(solver_order=4)
    with pytest.raises(NotImplementedError, match="third-order"):
        DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min")
    with pytest.raises(NotImplementedError, match="use_flow_sigmas"):
        DPMSolverMultistepScheduler(use_flow_sigmas=True)
    with pytest.raises(ValueError, match="exceeds"):
        DPMSolverMultistepScheduler().set_timesteps(1001)
    with pytest.raises(ValueError, match="descending"):
        DPMSolverMultistepScheduler().set_timesteps(timesteps=[1, 500])
    with pytest.raises(ValueError, match="begin_index"):
        ready(DPMSolverMultistepScheduler).set_begin_index(10)
    with pytest.raises(ValueError, match="2 x 3 channels"):
        s = ready(DPMSolverMultistepScheduler, variance_type="learned")
        s.step(x, s.timesteps[0], x)
    with pytest.raises(ValueError, match="generator or variance_noise"):
        s = ready(DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++")
        s.step(x, s.timesteps[0], x, generator=gen(0), variance_noise=x)
