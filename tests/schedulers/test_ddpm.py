"""fusediff's DDPMScheduler against diffusers' on whole runs, its dtypes and layouts, and its errors.

Parity runs go over every beta schedule, prediction type and variance type, the three spacings,
custom timesteps, clipping and dynamic thresholding, zero-terminal-SNR betas, seeded noise (one
generator, or one per batch element) and the full chain; see parity.py for the comparison.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from schedulers.parity import (SHAPE, FakeModel, count_fused_calls, gen, noise_drawn_in, raises_in_both, run_parity,
                               set_all, start_sample, twins)
from support.tolerance import assert_within_ref_error

from fusediff.kernels import scheduler_step_coeffs as SC
from fusediff.kernels import use_backend
from fusediff.schedulers import DDPMScheduler, SchedulerOutput

CONFIGS = {
    "default": {},
    "scaled_linear-v-fixed_large-trailing": dict(beta_schedule="scaled_linear", prediction_type="v_prediction",
                                                 variance_type="fixed_large", clip_sample=False,
                                                 timestep_spacing="trailing"),
    "cosine-sample-fixed_small_log-linspace": dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                                                   variance_type="fixed_small_log", clip_sample_range=0.8,
                                                   timestep_spacing="linspace"),
    "learned_range": dict(variance_type="learned_range"),
    "learned-v": dict(variance_type="learned", prediction_type="v_prediction"),
    "threshold-offset": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5, steps_offset=1),
    "threshold-learned_range-sample": dict(thresholding=True, variance_type="learned_range", prediction_type="sample"),
    "threshold-learned_range-v": dict(thresholding=True, variance_type="learned_range", prediction_type="v_prediction",
                                      dynamic_thresholding_ratio=0.8, sample_max_value=2.0),
    "IF-stage-I": dict(beta_schedule="squaredcos_cap_v2", variance_type="learned_range", thresholding=True,
                       dynamic_thresholding_ratio=0.95, sample_max_value=1.5),  # DeepFloyd IF's scheduler
    "zero_snr-v-trailing": dict(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                timestep_spacing="trailing", clip_sample=False),
    "sigmoid": dict(beta_schedule="sigmoid"),
    "laplace-linspace": dict(beta_schedule="laplace", timestep_spacing="linspace"),
    "trained_betas-T100": dict(num_train_timesteps=100, trained_betas=torch.linspace(1e-3, 0.05, 100).tolist()),
}


def model_for(config: dict) -> FakeModel:
    variance = config.get("variance_type")
    return FakeModel(variance=variance if variance in ("learned", "learned_range") else None)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_strided_run(name):
    config = CONFIGS[name]
    ours, theirs = DDPMScheduler(**config), twins(diffusers.DDPMScheduler, **config)
    set_all((ours, *theirs), 12)
    assert torch.equal(ours.timesteps, theirs[0].timesteps), (ours.timesteps, theirs[0].timesteps)
    run_parity(ours, theirs, model_for(config), ours.timesteps, noise_seed=3, what=f"DDPM {name}")


def test_parity_full_chain_without_set_timesteps():
    """Before set_timesteps DDPM steps t -> t - 1; the last steps are where float32 coefficients cancel."""
    ours, theirs = DDPMScheduler(), twins(diffusers.DDPMScheduler)
    assert torch.equal(ours.timesteps, theirs[0].timesteps)
    run_parity(ours, theirs, FakeModel(), range(40, -1, -1), noise_seed=5, what="DDPM full chain")


@pytest.mark.parametrize("timesteps", [[999, 700, 400, 100, 5, 0], [500, 499, 250, 3]], ids=["to-0", "stops-at-3"])
def test_parity_custom_timesteps(timesteps):
    ours, theirs = DDPMScheduler(), twins(diffusers.DDPMScheduler)
    set_all((ours, *theirs), timesteps=timesteps)
    assert torch.equal(ours.timesteps, theirs[0].timesteps) and ours.custom_timesteps
    assert [ours.previous_timestep(t) for t in timesteps] == [int(theirs[0].previous_timestep(t)) for t in timesteps]
    run_parity(ours, theirs, FakeModel(), timesteps, noise_seed=11, what=f"DDPM custom {timesteps}")


def test_parity_one_generator_per_sample():
    ours, theirs = DDPMScheduler(), twins(diffusers.DDPMScheduler)
    set_all((ours, *theirs), 8)
    run_parity(ours, theirs, FakeModel(), ours.timesteps, noise_seed=21, per_sample_generators=True,
               what="DDPM generator list")


def test_fixed_large_log_adds_sqrt_beta_noise():
    """diffusers takes the square root of log(beta_t) here (NaN); fusediff adds exp(0.5 log beta_t) noise."""
    log_form, plain = DDPMScheduler(variance_type="fixed_large_log"), DDPMScheduler(variance_type="fixed_large")
    set_all((log_form, plain), 10)
    x = start_sample()
    for t in log_form.timesteps:
        a = log_form.step(FakeModel()(x, t), t, x, generator=gen(1)).prev_sample
        b = plain.step(FakeModel()(x, t), t, x, generator=gen(1)).prev_sample
        assert torch.isfinite(a).all() and torch.equal(a, b), int(t)
        x = a


@pytest.mark.parametrize("name", ["default", "learned_range", "threshold-offset",
                                  "cosine-sample-fixed_small_log-linspace", "IF-stage-I"])
def test_float64_matches_diffusers_float64(name):
    """In float64 both libraries compute the same formulas without float32 rounding: equal to ~1e-12."""
    config = CONFIGS[name]
    ours, theirs = DDPMScheduler(**config), twins(diffusers.DDPMScheduler, **config)
    set_all((ours, *theirs), 10)
    model = FakeModel(dtype=torch.float64, variance=model_for(config).variance)
    run_parity(ours, theirs, model, ours.timesteps, noise_seed=3, x=start_sample(dtype=torch.float64),
               rtol=1e-11, atol=1e-11, cond=1e-14, slack=False, what=f"DDPM float64 {name}")


@pytest.mark.parametrize("config", [{}, dict(variance_type="learned_range", thresholding=True), CONFIGS["IF-stage-I"]],
                         ids=["default", "learned_range-threshold", "IF-stage-I"])
def test_half_precision_within_diffusers_error(config):
    """float16 inputs: ours may be at most twice as far from a float64 run as diffusers' float16 run is.

    This pins the one deliberate float16 difference: our learned-range noise scale exp(v_a + v_b*v) and
    the update are computed in float32 and rounded once, where diffusers computes the log-variance, its
    exp and the sum in float16. x0 and its thresholding are diffusers' own (x0 rounded to float16, the
    quantile in float32)."""
    ours, lo = DDPMScheduler(**config), diffusers.DDPMScheduler(**config)
    _, exact = twins(diffusers.DDPMScheduler, **config)
    set_all((ours, lo, exact), 10)
    model = FakeModel(variance=model_for(config).variance)
    for t in ours.timesteps:
        x = start_sample(seed=int(t)).half()
        m = model(x.float(), t).half()
        mine = ours.step(m, t, x, generator=gen(int(t)))
        theirs = lo.step(m, t, x, generator=gen(int(t)))
        with noise_drawn_in(torch.float16):
            ref = exact.step(m.double(), t, x.double(), generator=gen(int(t)))
        assert mine.prev_sample.dtype == torch.float16
        for field in ("prev_sample", "pred_original_sample"):
            assert_within_ref_error(getattr(mine, field), getattr(theirs, field), getattr(ref, field),
                                    f"DDPM float16 t={int(t)} {field}")


def test_mixed_dtypes_promote_like_diffusers():
    """A float16 model output on a float32 sample gives a float32 step, as in diffusers."""
    ours, lo = DDPMScheduler(), diffusers.DDPMScheduler()
    _, exact = twins(diffusers.DDPMScheduler)
    x, m = start_sample(), FakeModel(dtype=torch.float16)(start_sample(), 500)
    mine, theirs = ours.step(m, 500, x, generator=gen(0)), lo.step(m, 500, x, generator=gen(0))
    assert mine.prev_sample.dtype == theirs.prev_sample.dtype == torch.float32
    # diffusers rounds the float16 noise term in float16; compare to an exact run on the same draws
    noise = torch.randn(SHAPE, generator=gen(0), dtype=torch.float16).double()
    ref = exact.step(m.double(), 500, x.double(), generator=gen(0)).pred_original_sample
    assert_within_ref_error(mine.pred_original_sample, theirs.pred_original_sample, ref, "mixed x0")
    a_t, a_prev = exact.alphas_cumprod[500].item(), exact.alphas_cumprod[499].item()
    mean = (a_prev**0.5 * (1 - a_t / a_prev) * ref + (a_t / a_prev) ** 0.5 * (1 - a_prev) * x.double()) / (1 - a_t)
    std = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    assert_within_ref_error(mine.prev_sample, theirs.prev_sample, mean + std * noise, "mixed prev_sample")


def test_layouts_and_learned_split_give_identical_results():
    """channels-last samples and strided model outputs (the learned-variance split) are made dense first."""
    sched = DDPMScheduler(variance_type="learned_range")
    x = start_sample()
    m = FakeModel(variance="learned_range")(x, 300)  # (B, 2C, H, W): the halves are strided views
    plain = sched.step(m, 300, x, generator=gen(4))
    channels_last = sched.step(m.to(memory_format=torch.channels_last), 300,
                               x.to(memory_format=torch.channels_last), generator=gen(4))
    mixed = sched.step(m, 300, x.to(memory_format=torch.channels_last), generator=gen(4))
    for other in (channels_last, mixed):
        assert torch.equal(plain.prev_sample, other.prev_sample)
        assert torch.equal(plain.pred_original_sample, other.pred_original_sample)


def test_outputs_and_one_fused_call_per_step(monkeypatch):
    calls = count_fused_calls(monkeypatch)
    sched = DDPMScheduler()
    sched.set_timesteps(5)
    x = start_sample()
    out = sched.step(FakeModel()(x, 800), 800, x, generator=gen(0))
    assert isinstance(out, SchedulerOutput) and calls[0] == 1
    prev, x0 = sched.step(FakeModel()(x, 800), 800, x, generator=gen(0), return_dict=False)
    assert torch.equal(prev, out.prev_sample) and torch.equal(x0, out.pred_original_sample)
    thresholded = DDPMScheduler(thresholding=True, variance_type="learned_range")
    thresholded.step(FakeModel(variance="learned_range")(x, 800), 800, x, generator=gen(0))
    assert calls[0] == 3  # thresholding and the learned-range noise scale are inside the one fused call


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["threshold-offset", "learned_range", "IF-stage-I"])
def test_reference_backend_agrees(name, dtype):
    """The fused C++ step against the PyTorch reference, step by step on the same inputs."""
    config = CONFIGS[name]
    model = FakeModel(dtype=dtype, variance=model_for(config).variance)
    sched = {backend: DDPMScheduler(**config) for backend in ("fused", "ref")}
    for s in sched.values():
        s.set_timesteps(6)
    x = start_sample(dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-3, atol=2e-3)
    for t in sched["fused"].timesteps:
        m = model(x, t)
        outs = {}
        for backend, s in sched.items():
            with use_backend(backend):
                outs[backend] = s.step(m, t, x, generator=gen(int(t)))
        for field in ("prev_sample", "pred_original_sample"):
            a, b = getattr(outs["fused"], field), getattr(outs["ref"], field)
            assert a.dtype == dtype
            torch.testing.assert_close(a, b, **tol, msg=lambda msg: f"{name} t={int(t)} {field}: {msg}")
        x = outs["fused"].prev_sample


@pytest.mark.parametrize("thresholding", [False, True])
def test_learned_range_halves_go_to_the_op_as_views(monkeypatch, thresholding):
    """The (B, 2C, ...) model output is not copied: the op gets its two halves as batch-strided views,
    the learned-range scale as coefficients and the thresholding as its argument."""
    import fusediff.schedulers.fused_step as utils

    seen = []
    real = utils.scheduler_step

    def spy(sample, model_output, coeffs, **kwargs):
        seen.append((model_output, coeffs, kwargs))
        return real(sample, model_output, coeffs, **kwargs)

    monkeypatch.setattr(utils, "scheduler_step", spy)
    sched = DDPMScheduler(variance_type="learned_range", thresholding=thresholding, dynamic_thresholding_ratio=0.9,
                          sample_max_value=1.2)
    sched.set_timesteps(10)
    x = start_sample()
    both = FakeModel(variance="learned_range")(x, 500)
    t = int(sched.timesteps[3])
    sched.step(both, t, x, generator=gen(0))
    (m, coeffs, kwargs), = seen
    c = x.shape[1]
    assert m.data_ptr() == both.data_ptr() and kwargs["variance"].data_ptr() == both[:, c:].data_ptr()
    assert (coeffs.v_a, coeffs.v_b) == SC.ddpm_learned_range(sched._alpha_bar(t, 1.0),
                                                             sched._alpha_bar(sched.previous_timestep(t), 1.0))
    assert kwargs["threshold"] == ((0.9, 1.2) if thresholding else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_noise_and_velocity_match(dtype):
    ours, theirs = DDPMScheduler(beta_schedule="scaled_linear"), diffusers.DDPMScheduler(beta_schedule="scaled_linear")
    x0, noise = start_sample(dtype=dtype, seed=1), start_sample(dtype=dtype, seed=2)
    t = torch.tensor([0, 999])
    for name in ("add_noise", "get_velocity"):
        a, b = getattr(ours, name)(x0, noise, t), getattr(theirs, name)(x0, noise, t)
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


SPACINGS = st.sampled_from(["linspace", "leading", "trailing"])


@given(T=st.sampled_from([1000, 999, 50]), n=st.integers(1, 60), spacing=SPACINGS,
       offset=st.integers(0, 1))
def test_timesteps_match(T, n, spacing, offset):
    n = min(n, T)
    ours = DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    theirs = diffusers.DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    set_all((ours, theirs), n)
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.timesteps.dtype == torch.int64
    prevs = [int(theirs.previous_timestep(t)) for t in theirs.timesteps]
    assert [ours.previous_timestep(t) for t in ours.timesteps] == prevs


# -- errors ------------------------------------------------------------------------------------
both_raise = raises_in_both(DDPMScheduler)


def test_errors_shared_with_diffusers():
    x = start_sample()
    both_raise(NotImplementedError, lambda c: c(beta_schedule="cosine"))
    both_raise(ValueError, lambda c: c(prediction_type="flow").step(x, 10, x))
    both_raise(ValueError, lambda c: c(timestep_spacing="uniform").set_timesteps(10))
    both_raise(ValueError, lambda c: c().set_timesteps(1001))
    both_raise(ValueError, lambda c: c().set_timesteps(10, timesteps=[5, 1]))
    both_raise(ValueError, lambda c: c().set_timesteps(timesteps=[5, 7, 1]))
    both_raise(ValueError, lambda c: c().set_timesteps(timesteps=[1000, 1]))
    both_raise(TypeError, lambda c: c().set_timesteps())


def test_errors_where_diffusers_fails_silently_or_obscurely():
    x = start_sample()
    with pytest.raises(ValueError, match="variance_type"):
        DDPMScheduler(variance_type="fixed")
    with pytest.raises(ValueError, match="twice the sample's channels"):
        DDPMScheduler(variance_type="learned").step(x, 10, x)
    sched = DDPMScheduler()
    sched.set_timesteps(10)
    with pytest.raises(ValueError, match="not one of this run's timesteps"):
        sched.step(x, 901, x)
    with pytest.raises(ValueError, match="outside"):
        sched.step(x, -1, x)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        DDPMScheduler(rescale_betas_zero_snr=True).step(x, 999, x)
    with pytest.raises(ValueError, match=">= 0"):
        sched.set_timesteps(timesteps=[5, -1])
    with pytest.raises(ValueError, match="at least 1"):
        sched.set_timesteps(0)
    with pytest.raises(ValueError, match="shape"):
        sched.step(x[:, :2], 900, x, generator=gen(0))
    with pytest.raises(ValueError, match="clip_sample_range"):
        DDPMScheduler(clip_sample_range=0.0).step(x, 10, x)


def test_parity_check_can_fail():
    """A wrong prediction type, or noise from another seed, must fail the comparison."""
    ours, theirs = DDPMScheduler(prediction_type="v_prediction"), twins(diffusers.DDPMScheduler)
    set_all((ours, *theirs), 5)
    with pytest.raises(AssertionError, match="not close"):
        run_parity(ours, theirs, FakeModel(), ours.timesteps, noise_seed=0, what="wrong prediction type")
    ours, theirs = DDPMScheduler(), twins(diffusers.DDPMScheduler)
    set_all((ours, *theirs), 5)
    with pytest.raises(AssertionError, match="not close"):  # one generator shared: each draws other numbers
        run_parity(ours, theirs, FakeModel(), ours.timesteps, what="other noise", step_kwargs={"generator": gen(1)})
