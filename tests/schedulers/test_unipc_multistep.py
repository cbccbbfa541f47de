"""fusediff's UniPCMultistepScheduler against diffusers' on whole runs, its configs and its errors.

Parity runs (``run_parity`` below: every step's sample and converted output against diffusers' float32
run and its float64 twin, as multistep_parity's, with the bound on the sample widened for the
corrector's carried rounding) cover orders 1/2/3, bh1 and bh2, the corrector disabled at some steps,
lower_order_final on and off, the three prediction types and spacings, steps_offset, Karras (with and
without sigma_min/sigma_max) and exponential sigmas, both final sigma types, thresholding (also at
order 3, where the step reads all four history slots), zero-SNR betas, noise prediction
(predict_x0=False), and samples replaced between steps; float64 inputs are held to float64 accuracy.
bh1 and noise-prediction runs use final_sigmas_type='sigma_min' because diffusers returns NaN on
their step to sigma = 0; that step, and a zero-length last step, are checked against the limit
computed from diffusers' own state. The coefficient functions: tests/kernels/test_scheduler_step_unipc.py.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from schedulers.multistep_parity import (ATOL, COND, RTOL, assert_errors_shared_with_diffusers,
                                         assert_from_config_like_diffusers, assert_round_trip_both_ways,
                                         assert_same_schedule, assert_signature_and_defaults_match, assert_step_errors,
                                         in_float64, prepare, run_float64, run_from_begin_index, run_half, set_all,
                                         term_sizes)
from schedulers.parity import FakeModel, check, raises_in_both, ready, start_sample
from support.tolerance import assert_within_ref_error

import fusediff.schedulers.multistep_scheduler as base
from fusediff.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler
from fusediff.schedulers.scheduling_base import SchedulerOutput

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
THEIRS = diffusers.UniPCMultistepScheduler
OURS = UniPCMultistepScheduler
SIGMA_MIN = dict(final_sigmas_type="sigma_min")

# name: (config, num_inference_steps)
CASES = {
    "2-bh2-default": ({}, 10),
    "2-bh2-25-steps": ({}, 25),
    "1-bh2": (dict(solver_order=1), 10),
    "3-bh2": (dict(solver_order=3), 10),
    "3-bh1-trailing": (dict(solver_order=3, solver_type="bh1", timestep_spacing="trailing", **SIGMA_MIN), 10),
    "2-bh1-leading-offset": (dict(solver_type="bh1", timestep_spacing="leading", steps_offset=1, **SIGMA_MIN), 12),
    "3-no-lower_order_final": (dict(solver_order=3, lower_order_final=False, **SIGMA_MIN), 6),
    "3-corrector-disabled": (dict(solver_order=3, disable_corrector=[0, 2, 3, 7]), 10),
    "2-corrector-disabled-at-last": (dict(disable_corrector=[7]), 9),
    "2-karras-v-scaled_linear": (dict(use_karras_sigmas=True, prediction_type="v_prediction",
                                      beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), 20),
    "3-karras-sigma_min_max-sample": (dict(solver_order=3, use_karras_sigmas=True, sigma_min=0.05, sigma_max=40.0,
                                           prediction_type="sample"), 8),
    "2-exponential-sigma_min": (dict(use_exponential_sigmas=True, **SIGMA_MIN), 12),
    "2-sample-threshold": (dict(prediction_type="sample", thresholding=True, sample_max_value=1.5), 10),
    "3-v-threshold": (dict(solver_order=3, prediction_type="v_prediction", thresholding=True, sample_max_value=2.0,
                           dynamic_thresholding_ratio=0.9), 10),
    "2-v-trailing-zero_snr": (dict(prediction_type="v_prediction", timestep_spacing="trailing",
                                   rescale_betas_zero_snr=True), 10),
    "2-cosine": (dict(beta_schedule="squaredcos_cap_v2"), 10),
    "noise-3-bh2": (dict(predict_x0=False, solver_order=3, **SIGMA_MIN), 10),
    "noise-2-bh1-v": (dict(predict_x0=False, solver_type="bh1", prediction_type="v_prediction", **SIGMA_MIN), 10),
    "noise-1-sample-threshold-unused": (dict(predict_x0=False, solver_order=1, prediction_type="sample",
                                             thresholding=True, **SIGMA_MIN), 10),
}


def run_parity(ours, theirs, model=None, timesteps=None, *, x=None, replace=None, what="", rtol=RTOL, atol=ATOL,
               cond=COND, slack=True):
    """Step ours and diffusers' (lo, exact) over ``timesteps`` (default: ours'), all on the same inputs
    (our last output, or ``replace(i, it)``); check every step's sample and converted output.

    The bound is multistep_parity's but for one term: UniC restarts from each scheduler's own last
    result, so rounding is carried from step to step (and grows by alpha_t/alpha_s0 > 1 per step with
    noise prediction) separately in each run, a random walk per element. The sample is therefore
    allowed twice diffusers' largest error over the tensor (the max-norm rule of support.tolerance),
    not twice its error at the same element; the converted output, formed afresh each step from the
    shared inputs, keeps the per-element rule. Returns the last samples (ours, lo, exact).
    """
    lo, exact = theirs
    model = FakeModel() if model is None else model
    timesteps = ours.timesteps if timesteps is None else timesteps
    x = start_sample() if x is None else x
    outs = None
    for i, t in enumerate(timesteps):
        if replace is not None:
            x = replace(i, x)
        m = model(x, t)
        with term_sizes() as sizes:
            mine = ours.step(m, t, x).prev_sample
        low = lo.step(m, t, x).prev_sample
        with in_float64(exact):
            ref = exact.step(m.double(), t, x.double()).prev_sample
        outs = (mine, low, ref)
        where = f"{what} step {i} (t={int(t)})"
        assert mine.shape == low.shape and mine.dtype == low.dtype, (where, mine.dtype, low.dtype)
        walk = 2 * (low.double() - ref).abs().max() if slack else 0.0
        check(mine, None, ref, f"{where}: prev_sample", rtol, atol, cond * sizes["out"] + walk)
        converted = [s.model_outputs[-1] for s in (ours, lo, exact)]
        check(converted[0], converted[1] if slack else None, converted[2], f"{where}: converted output", rtol, atol,
              cond * sizes["x0"])
        x = mine
    return outs


@pytest.mark.parametrize("name", list(CASES))
def test_parity_run(name):
    config, n = CASES[name]
    ours, theirs = prepare(OURS, config, n)
    assert_same_schedule(ours, theirs[0])
    run_parity(ours, theirs, what=f"UniPC {name}")


@pytest.mark.parametrize("name", ["3-bh2", "3-bh1-trailing", "3-v-threshold", "noise-2-bh1-v"])
def test_float64_inputs_to_float64_accuracy(name):
    config, n = CASES[name]
    ours, theirs = prepare(OURS, config, n)
    run_float64(ours, theirs, f"UniPC float64 {name}", run=run_parity)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_diffusers_error(dtype):
    run_half(*prepare(OURS, dict(solver_order=3), 10), dtype, what="UniPC ",
             model=lambda x, t: FakeModel()(x.float(), t).to(dtype))


def test_corrector_ignores_changes_to_the_passed_sample_like_diffusers():
    """Pipelines may replace the sample between steps (inpainting blends in the known region). diffusers'
    UniC restarts from its own last result and uses the passed sample only to convert the model output."""
    ours, theirs = prepare(OURS, dict(solver_order=3), 10)

    def replace(i, x):
        return 0.8 * x + 0.1 * start_sample(seed=100 + i)  # out of place, as a pipeline would
    run_parity(ours, theirs, replace=replace, what="UniPC replaced samples")


def test_prev_sample_changed_in_place_raises():
    sched = ready(OURS)
    x = start_sample()
    prev = sched.step(FakeModel()(x, sched.timesteps[0]), sched.timesteps[0], x).prev_sample
    prev.mul_(0.5)
    with pytest.raises(RuntimeError, match="in place"):
        sched.step(FakeModel()(prev, sched.timesteps[1]), sched.timesteps[1], prev)
    sched = ready(OURS, disable_corrector=[0])  # no corrector at step 1: the last output is not read
    prev = sched.step(FakeModel()(x, sched.timesteps[0]), sched.timesteps[0], x).prev_sample
    prev.mul_(0.5)
    sched.step(FakeModel()(prev, sched.timesteps[1]), sched.timesteps[1], prev)


def test_inference_mode_run_equals_no_grad_run():
    """Inference tensors keep no version counter (the in-place check is skipped); results are the same."""
    runs = []
    for mode in (torch.no_grad, torch.inference_mode):
        sched, x = ready(OURS, solver_order=3), start_sample()
        with mode():
            for t in sched.timesteps:
                x = sched.step(FakeModel()(x, t), t, x).prev_sample
        runs.append(x)
    assert torch.equal(runs[0], runs[1])


def test_one_fused_call_per_step_with_the_last_output_in_history(monkeypatch):
    """Order 3, 10 steps: history = (last output, D_{i-1}, ...) with 0, 2, 3, then 4 tensors; 3 at the
    first-order last step. Thresholding adds one call (x0 before its threshold)."""
    calls, real = [], base.scheduler_step

    def spy(*args, **kwargs):
        calls.append(tuple(kwargs.get("history", ())))
        return real(*args, **kwargs)

    monkeypatch.setattr(base, "scheduler_step", spy)
    for thresholding, calls_per_step in ((False, 1), (True, 2)):
        sched, x = ready(OURS, solver_order=3, thresholding=thresholding), start_sample()
        lengths, last = [], None
        for t in sched.timesteps:
            calls.clear()
            prev = sched.step(FakeModel()(x, t), t, x).prev_sample
            assert len(calls) == calls_per_step
            history = calls[-1]
            lengths.append(len(history))
            if len(history) > 0:
                assert history[0] is last, "the corrector must restart from the last output itself"
            x = last = prev
        assert lengths == [0, 2, 3, 4, 4, 4, 4, 4, 4, 3]


def run_to_a_nan_last_step(ours, theirs, what: str) -> torch.Tensor:
    """All but the last step compared as in run_parity; then the last step on a fresh sample, where diffusers'
    float32 run must be NaN (its float64 twin takes the step too, for its state). Returns our last output."""
    lo, exact = theirs
    run_parity(ours, theirs, timesteps=ours.timesteps[:-1], what=what)
    t, x = ours.timesteps[-1], start_sample(seed=5)
    m = FakeModel()(x, t)
    mine = ours.step(m, t, x).prev_sample
    assert torch.isnan(lo.step(m, t, x).prev_sample).all()
    with in_float64(exact):
        exact.step(m.double(), t, x.double())
    return mine


def test_last_step_to_sigma_zero_takes_the_limit():
    """bh1 (B(h) = -inf times a zero sum) and noise prediction (sigma_t (e^h - 1) eps, 0 * inf) are NaN in
    diffusers at the step to sigma = 0; the limit is the data prediction x0 at the last timestep."""
    for config in (dict(solver_type="bh1"), dict(predict_x0=False, solver_order=3)):
        ours, (lo, exact) = prepare(OURS, config, 8)
        mine = run_to_a_nan_last_step(ours, (lo, exact), f"UniPC {config}")
        alpha, sigma = ours.alpha_sigma(len(ours.timesteps) - 1)

        def limit(s):  # x0, or from eps: x0 = (x^c - sigma eps) / alpha with x^c the corrected sample
            d = s.model_outputs[-1]
            return d if ours.predict_x0 else (s.last_sample - sigma * d) / alpha
        assert_within_ref_error(mine, limit(lo), limit(exact), f"UniPC {config} last step")


def test_zero_length_last_step_is_the_corrected_sample():
    """Karras levels end at sigma_min, also the final level: the last step has h = 0. Its third-order
    predictor is 0/0 in diffusers (NaN); the limit h -> 0 is the corrected sample itself."""
    config = dict(solver_order=3, use_karras_sigmas=True, lower_order_final=False, **SIGMA_MIN)
    ours, (lo, exact) = prepare(OURS, config, 6)
    assert ours.sigmas[-1] == ours.sigmas[-2]
    mine = run_to_a_nan_last_step(ours, (lo, exact), "UniPC karras")
    assert_within_ref_error(mine, lo.last_sample, exact.last_sample, "UniPC zero-length last step")


def test_mid_schedule_start_with_begin_index():
    ours, (lo, exact) = prepare(OURS, dict(solver_order=3), 20)
    run_from_begin_index(ours, (lo, exact), 8, what="UniPC begin_index 8", run=run_parity)
    assert ours.step_index == lo.step_index == 20


def test_mid_schedule_start_by_timestep_then_new_run():
    ours, (lo, exact) = prepare(OURS, {}, 15)
    run_parity(ours, (lo, exact), timesteps=ours.timesteps[5:9], what="UniPC start at index 5")
    set_all((ours, lo, exact), 7)  # a new run forgets the last one (history, corrector start, order)
    assert ours.this_order == 0 and ours.model_outputs == [None, None]
    run_parity(ours, (lo, exact), what="UniPC second run")


def test_outputs_tuple_and_state():
    sched, x = ready(OURS, n=5), start_sample()
    out = sched.step(FakeModel()(x, sched.timesteps[0]), sched.timesteps[0], x)
    assert isinstance(out, SchedulerOutput) and out.prev_sample.shape == x.shape and sched.step_index == 1
    (prev,) = sched.step(FakeModel()(x, sched.timesteps[1]), int(sched.timesteps[1]), out.prev_sample,
                         return_dict=False)
    assert prev.shape == x.shape and sched.lower_order_nums == 2 and sched.this_order == 2
    assert sched.scale_model_input(x, 3) is x and len(sched) == 1000 and sched.order == THEIRS.order


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), spacing=st.sampled_from(["linspace", "leading", "trailing"]),
       sigmas=st.sampled_from([{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}]),
       final=st.sampled_from(["zero", "sigma_min"]), offset=st.integers(0, 1))
def test_schedules_match(n, spacing, sigmas, final, offset):
    config = dict(timestep_spacing=spacing, final_sigmas_type=final, steps_offset=offset, **sigmas)
    ours, theirs = OURS(**config), THEIRS(**config)
    for s in (ours, theirs):
        s.set_timesteps(n)
    assert_same_schedule(ours, theirs)


# -- configs -----------------------------------------------------------------------------------------
def test_signature_and_defaults_match_diffusers():
    # defaults as JSON: our disable_corrector default is (), diffusers' a shared []
    assert_signature_and_defaults_match(OURS, defaults_as_json=True)


NON_DEFAULT = dict(num_train_timesteps=500, beta_schedule="scaled_linear", solver_order=3,
                   prediction_type="v_prediction", thresholding=True, sample_max_value=2.0, solver_type="bh1",
                   lower_order_final=False, disable_corrector=[1, 3], use_karras_sigmas=True, final_sigmas_type="sigma_min",
                   timestep_spacing="trailing", rescale_betas_zero_snr=True, sigma_max=50.0)


def test_save_load_round_trip_both_ways(tmp_path):
    _, _, again = assert_round_trip_both_ways(tmp_path, OURS, NON_DEFAULT)
    assert again.disable_corrector == [1, 3]


@pytest.mark.parametrize("source", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
                                    "DEISMultistepScheduler"])
def test_from_config_of_other_schedulers_like_diffusers(source):
    extra = {"solver_type": "heun"} if source == "DPMSolverMultistepScheduler" else {}
    config = getattr(diffusers, source)(beta_schedule="scaled_linear", timestep_spacing="trailing", **extra).config
    ours = assert_from_config_like_diffusers(OURS, config)
    assert ours.config.solver_type == "bh2" and ours.config.beta_schedule == "scaled_linear"


def test_swap_to_other_schedulers_in_both_libraries():
    import fusediff
    unipc = OURS(beta_schedule="scaled_linear", prediction_type="v_prediction", solver_type="bh1")
    for name in ("DDIMScheduler", "DPMSolverMultistepScheduler"):
        for cls in (getattr(fusediff, name), getattr(diffusers, name)):
            other = cls.from_config(unipc.config)
            assert other.config.beta_schedule == "scaled_linear" and other.config.prediction_type == "v_prediction"
            if name == "DPMSolverMultistepScheduler":
                assert other.config.solver_type == "midpoint"
    ddim = fusediff.DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False)
    assert OURS.from_config(ddim.config).config.beta_schedule == "scaled_linear"


# -- errors ------------------------------------------------------------------------------------------
both_raise = raises_in_both(OURS)


def test_errors_shared_with_diffusers():
    x = start_sample()
    assert_errors_shared_with_diffusers(both_raise)
    both_raise(ValueError, lambda c: c(final_sigmas_type="one").set_timesteps(10))
    both_raise(ValueError, lambda c: c(shift_terminal=0.1))
    both_raise(ValueError, lambda c: ready(c, prediction_type="flow").step(x, 999, x))


def test_errors_where_diffusers_fails_silently_or_obscurely():
    x = start_sample()
    assert_step_errors(OURS)
    with pytest.raises(ValueError, match="solver_order"):
        OURS(solver_order=4)
    with pytest.raises(ValueError, match="lower_order_final"):
        OURS(solver_order=2, lower_order_final=False)  # diffusers: inf at the last step
    with pytest.raises(NotImplementedError, match="solver_p"):
        OURS(solver_p=diffusers.DDIMScheduler())
    with pytest.raises(NotImplementedError, match="use_flow_sigmas"):
        OURS(use_flow_sigmas=True)
    with pytest.raises(ValueError, match="prediction_type"):
        OURS(prediction_type="flow_prediction")
    with pytest.raises(TypeError, match="disable_corrector"):
        OURS(disable_corrector="0")
    with pytest.raises(TypeError, match="predict_x0"):
        OURS(predict_x0="yes")
    with pytest.raises(ValueError, match="shape"):  # a batch that changes mid-run meets the history
        s = ready(OURS)
        s.step(FakeModel()(x, s.timesteps[0]), s.timesteps[0], x)
        s.step(x[:1], s.timesteps[1], x[:1])
