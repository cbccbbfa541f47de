"""fusediff's DEISMultistepScheduler against diffusers' on whole runs, its configs, and its errors.

Parity runs (multistep_parity.run_parity: every step's sample and eps history against diffusers'
float32 run and its float64 twin) cover orders 1/2/3, lower_order_final on and off with few steps,
Karras and exponential sigmas (whose last level repeats), the three prediction types and spacings,
and thresholding (eps re-derived from the thresholded x0); float64 inputs are held to float64 accuracy.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from schedulers.multistep_parity import (assert_errors_shared_with_diffusers, assert_from_config_like_diffusers,
                                         assert_round_trip_both_ways, assert_same_schedule,
                                         assert_signature_and_defaults_match, prepare, run_float64,
                                         run_from_begin_index, run_half, run_parity)
from schedulers.parity import FakeModel, raises_in_both, start_sample

from fusediff.schedulers.scheduling_deis_multistep import DEISMultistepScheduler
from fusediff.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")]

# name: (config, num_inference_steps)
CASES = {
    "order2-default": ({}, 10),
    "order2-25-steps": ({}, 25),
    "order1-leading-offset": (dict(solver_order=1, timestep_spacing="leading", steps_offset=1), 10),
    "order3-lower_order_final": (dict(solver_order=3), 10),
    "order3-no-lower_order_final": (dict(solver_order=3, lower_order_final=False), 6),
    "order3-karras-scaled_linear": (dict(solver_order=3, use_karras_sigmas=True, beta_schedule="scaled_linear",
                                         beta_start=0.00085, beta_end=0.012), 20),
    "order3-karras-short": (dict(solver_order=3, use_karras_sigmas=True, lower_order_final=False), 5),
    "order2-exponential-trailing-v": (dict(use_exponential_sigmas=True, timestep_spacing="trailing",
                                           prediction_type="v_prediction"), 12),
    "order3-cosine-sample": (dict(solver_order=3, beta_schedule="squaredcos_cap_v2", prediction_type="sample"), 10),
    "order2-sample-threshold": (dict(prediction_type="sample", thresholding=True, sample_max_value=1.5), 10),
    "order3-eps-threshold": (dict(solver_order=3, thresholding=True, sample_max_value=2.0, lower_order_final=False), 8),
}


@pytest.mark.parametrize("name", list(CASES))
def test_parity_run(name):
    ours, theirs = prepare(DEISMultistepScheduler, *CASES[name])
    assert_same_schedule(ours, theirs[0])
    run_parity(ours, theirs, what=f"DEIS {name}")


@pytest.mark.parametrize("name", ["order3-no-lower_order_final", "order3-karras-scaled_linear", "order3-eps-threshold"])
def test_float64_inputs_to_float64_accuracy(name):
    ours, theirs = prepare(DEISMultistepScheduler, *CASES[name])
    run_float64(ours, theirs, f"DEIS float64 {name}")


def test_mid_schedule_start_with_begin_index():
    ours, theirs = prepare(DEISMultistepScheduler, dict(solver_order=3), 20)
    run_from_begin_index(ours, theirs, 6, what="DEIS begin_index 6")


def test_mixed_dtypes_promote_like_diffusers():
    """A float16 model output on a float32 sample: float32 results (check() asserts the dtype)."""
    ours, theirs = prepare(DEISMultistepScheduler, dict(solver_order=3), 10)
    run_parity(ours, theirs, FakeModel(dtype=torch.float16), what="DEIS float16 model output")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_diffusers_error(dtype):
    """Half-precision samples: ours within twice diffusers' own error (+ the dtype's atol) of the float64 twin."""
    run_half(*prepare(DEISMultistepScheduler, dict(solver_order=3), 10), dtype)


# -- configs -----------------------------------------------------------------------------------
def test_signature_and_defaults_match_diffusers():
    assert_signature_and_defaults_match(DEISMultistepScheduler)


def test_save_load_round_trip_both_ways(tmp_path):
    config = dict(num_train_timesteps=500, solver_order=3, prediction_type="v_prediction", thresholding=True,
                  use_karras_sigmas=True, lower_order_final=False, timestep_spacing="trailing",
                  trained_betas=torch.linspace(1e-4, 0.03, 500).tolist())
    assert_round_trip_both_ways(tmp_path, DEISMultistepScheduler, config)


@pytest.mark.parametrize("source", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
                                    "UniPCMultistepScheduler"])
def test_from_config_of_other_schedulers_like_diffusers(source):
    config = getattr(diffusers, source)(beta_schedule="scaled_linear", timestep_spacing="leading").config
    ours = assert_from_config_like_diffusers(DEISMultistepScheduler, config)
    assert ours.config.algorithm_type == "deis" and ours.config.solver_type == "logrho"


def test_swap_with_fusediff_dpmsolver():
    deis = DEISMultistepScheduler.from_config(DPMSolverMultistepScheduler(solver_type="heun").config)
    assert deis.config.algorithm_type == "deis" and deis.config.solver_type == "logrho"
    dpm = DPMSolverMultistepScheduler.from_config(deis.config)
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_type == "midpoint"


# -- errors ------------------------------------------------------------------------------------
both_raise = raises_in_both(DEISMultistepScheduler)


def test_errors_shared_with_diffusers():
    assert_errors_shared_with_diffusers(both_raise)
    both_raise(NotImplementedError, lambda c: c(algorithm_type="sde-dpmsolver++"))


def test_errors_where_diffusers_fails_silently_or_obscurely():
    x = start_sample()
    with pytest.raises(ValueError, match="solver_order"):
        DEISMultistepScheduler(solver_order=0)
    with pytest.raises(ValueError, match="prediction_type"):
        DEISMultistepScheduler(prediction_type="flow_prediction")
    s = DEISMultistepScheduler()
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="not in the schedule"):
        s.step(x, 5, x)
    with pytest.raises(TypeError, match="torch.Tensor"):
        s.step(x.numpy(), s.timesteps[0], x)
