"""fusediff's LMSDiscreteScheduler against diffusers' on whole runs, its orders, tables and errors.

Parity runs cover the three prediction types, karras and exponential sigmas, the spacings with
steps_offset and the beta schedules, orders 1 to 5 (the history the fused op reads), an order
changed between steps, img2img runs entered mid-schedule (where diffusers takes the order from the
step index), float64 and float16 inputs, and the fused calls per step (one for epsilon, two else).
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from schedulers.parity import FakeModel, check, raises_in_both, start_sample
from schedulers.sigma_parity import (assert_configs_interchange, assert_from_config_like_diffusers,
                                     assert_signature_matches, assert_step_refusals, assert_unsupported_options_refused,
                                     count_fused_calls, prepare, run_float64, run_half, run_img2img, run_sigma_parity)

from fusediff.schedulers import EulerDiscreteScheduler, LMSDiscreteScheduler

CASES = {
    "default": {},
    "v-karras": dict(prediction_type="v_prediction", use_karras_sigmas=True),
    "sample-exponential-leading-offset": dict(prediction_type="sample", use_exponential_sigmas=True,
                                              timestep_spacing="leading", steps_offset=1),
    "scaled_linear-trailing-v": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                     timestep_spacing="trailing", prediction_type="v_prediction"),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}


@pytest.mark.parametrize("num_steps", [10, 25])
@pytest.mark.parametrize("name", list(CASES))
def test_parity_run(name, num_steps):
    ours, theirs = prepare(LMSDiscreteScheduler, CASES[name], num_steps)
    run_sigma_parity(ours, theirs, FakeModel(), what=f"LMS {name} {num_steps} steps")


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_parity_orders(order):
    ours, theirs = prepare(LMSDiscreteScheduler, CASES["v-karras"], 12)
    run_sigma_parity(ours, theirs, FakeModel(), step_kwargs=dict(order=order), what=f"LMS order {order}")


def test_parity_order_changed_between_steps():
    """diffusers drops one old derivative per step when the order falls, and keeps using the rest."""
    ours, (lo, exact) = prepare(LMSDiscreteScheduler, {}, 10)
    x = start_sample() * float(ours.init_noise_sigma)
    for i, t in enumerate(ours.timesteps):
        order = [4, 4, 4, 4, 2, 2, 4, 3, 1, 4][i]
        for s in (ours, lo, exact):
            s.scale_model_input(x, t)
        m = FakeModel()(x, t)
        mine, theirs = ours.step(m, t, x, order=order), lo.step(m, t, x, order=order)
        ref = exact.step(m.double(), t, x.double(), order=order)
        assert len(ours.derivatives) == len(lo.derivatives)
        check(mine.prev_sample, theirs.prev_sample, ref.prev_sample, f"LMS changing order, step {i}")
        x = mine.prev_sample


@pytest.mark.parametrize("set_begin", [True, False], ids=["begin_index", "timestep_lookup"])
@pytest.mark.parametrize("name", ["default", "v-karras"])
def test_img2img_start_mid_schedule(name, set_begin):
    run_img2img(LMSDiscreteScheduler, CASES[name], 12, 0.6, set_begin=set_begin, what=f"LMS img2img {name}")


@pytest.mark.parametrize("name", ["default", "v-karras", "sample-exponential-leading-offset"])
def test_float64_matches_diffusers_float64(name):
    """diffusers' float64 twin integrates the weights with scipy's quad on float64 sigmas: exact to ~1e-15."""
    run_float64(LMSDiscreteScheduler, CASES[name], 10, f"LMS float64 {name}", tol=1e-10)


def test_half_precision_within_diffusers_error():
    run_half(LMSDiscreteScheduler, CASES["v-karras"], torch.float16)


@pytest.mark.parametrize("pred,per_step", [("epsilon", 1), ("v_prediction", 2), ("sample", 2)])
def test_fused_calls_and_history(monkeypatch, pred, per_step):
    """epsilon keeps the model output as the derivative; the others form it with a second fused op."""
    calls = count_fused_calls(monkeypatch)
    sched = LMSDiscreteScheduler(prediction_type=pred)
    sched.set_timesteps(6)
    x = start_sample() * float(sched.init_noise_sigma)
    for k, t in enumerate(sched.timesteps, start=1):
        m = FakeModel()(sched.scale_model_input(x, t), t)
        x = sched.step(m, t, x).prev_sample
        assert calls[0] == per_step * k and len(sched.derivatives) == min(k, 4)
        if pred == "epsilon":
            assert sched.derivatives[-1] is m
    sched.set_timesteps(6)
    assert sched.derivatives == []


def test_scale_model_input_and_add_noise_match():
    ours, (lo, _) = prepare(LMSDiscreteScheduler, CASES["sample-exponential-leading-offset"], 10)
    x0, noise, t = start_sample(seed=1), start_sample(seed=2), ours.timesteps[[2, 9]]
    assert float(ours.init_noise_sigma) == float(lo.init_noise_sigma)
    assert torch.equal(ours.add_noise(x0, noise, t), lo.add_noise(x0, noise, t))
    assert torch.equal(ours.scale_model_input(x0, t[0]), lo.scale_model_input(x0, t[0]))


def test_from_config_swaps_with_euler():
    euler = diffusers.EulerDiscreteScheduler(timestep_spacing="leading", steps_offset=1, use_exponential_sigmas=True,
                                             prediction_type="sample")
    _, back = assert_from_config_like_diffusers(LMSDiscreteScheduler, euler, 11, "LMS from an Euler config",
                                                EulerDiscreteScheduler)
    assert back.config.use_exponential_sigmas and back.config.steps_offset == 1


def test_signature_defaults_and_initial_tables_match():
    assert_signature_matches(LMSDiscreteScheduler)


def test_saved_configs_load_in_both_libraries(tmp_path):
    assert_configs_interchange(tmp_path, LMSDiscreteScheduler, CASES["v-karras"])


def test_other_order_is_caught():
    """The comparison can fail: ours of order 3 against diffusers' of order 4."""
    ours, theirs = prepare(LMSDiscreteScheduler, {}, 10)
    with pytest.raises(AssertionError, match="not close"):
        run_sigma_parity(ours, theirs, FakeModel(), step_kwargs=dict(order=4), our_kwargs=dict(order=3))


# -- errors ------------------------------------------------------------------------------------
both_raise = raises_in_both(LMSDiscreteScheduler)


def test_errors_shared_with_diffusers():
    both_raise(NotImplementedError, lambda c: c(beta_schedule="sigmoid"))
    both_raise(ValueError, lambda c: c(use_karras_sigmas=True, use_exponential_sigmas=True))
    both_raise(ValueError, lambda c: c(timestep_spacing="uniform"))
    both_raise(TypeError, lambda c: c().set_timesteps(10, timesteps=[999, 500]))  # no custom schedules


def test_errors_where_diffusers_fails_obscurely():
    x = start_sample()
    sched = LMSDiscreteScheduler()
    sched.set_timesteps(3)
    with pytest.raises(ValueError, match="order"):
        sched.step(x, sched.timesteps[0], x, order=0)
    with pytest.raises(ValueError, match="order"):
        sched.step(x, sched.timesteps[0], x, order=6)  # more history than the fused op reads
    assert_step_refusals(LMSDiscreteScheduler, 3, 998.0)
    assert_unsupported_options_refused(LMSDiscreteScheduler)
