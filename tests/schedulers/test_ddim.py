"""fusediff's DDIMScheduler against diffusers' on whole runs, its dtypes and layouts, and its errors.

Parity runs cover eta = 0 and eta > 0 (seeded generators, one per batch element, or given
variance_noise), use_clipped_model_output, clipping and dynamic thresholding, the three prediction
types and spacings, set_alpha_to_one, steps_offset and zero-terminal-SNR betas.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from schedulers.parity import (FakeModel, check, count_fused_calls, gen, raises_in_both, ready, run_parity, set_all,
                               start_sample, twins)
from support.tolerance import assert_within_ref_error

from fusediff.kernels import use_backend
from fusediff.schedulers import DDIMScheduler, SchedulerOutput

# (config, step arguments)
CASES = {
    "default": ({}, {}),
    "eta1-v-trailing-zero_snr": (dict(prediction_type="v_prediction", timestep_spacing="trailing",
                                      rescale_betas_zero_snr=True, set_alpha_to_one=False, clip_sample=False),
                                 dict(eta=1.0)),
    "eta0.5-sample-linspace-clipped_output": (dict(prediction_type="sample", timestep_spacing="linspace",
                                                   clip_sample_range=2.0),
                                              dict(eta=0.5, use_clipped_model_output=True)),
    "threshold-cosine-eta0.3": (dict(thresholding=True, beta_schedule="squaredcos_cap_v2"), dict(eta=0.3)),
    "threshold-clipped_output-v": (dict(thresholding=True, prediction_type="v_prediction", sample_max_value=2.0),
                                   dict(use_clipped_model_output=True)),
    "scaled_linear-offset-noclip": (dict(beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
                                         set_alpha_to_one=False), {}),
    "eta1-epsilon-clipped_output": ({}, dict(eta=1.0, use_clipped_model_output=True)),
}


@pytest.mark.parametrize("num_steps", [10, 50])
@pytest.mark.parametrize("name", list(CASES))
def test_parity_run(name, num_steps):
    config, kwargs = CASES[name]
    ours, theirs = DDIMScheduler(**config), twins(diffusers.DDIMScheduler, **config)
    set_all((ours, *theirs), num_steps)
    assert torch.equal(ours.timesteps, theirs[0].timesteps)
    seed = 3 if kwargs.get("eta", 0) > 0 else None
    run_parity(ours, theirs, FakeModel(), ours.timesteps, step_kwargs=kwargs, noise_seed=seed,
               what=f"DDIM {name} {num_steps} steps")


def test_parity_one_generator_per_sample():
    ours, theirs = DDIMScheduler(), twins(diffusers.DDIMScheduler)
    set_all((ours, *theirs), 10)
    run_parity(ours, theirs, FakeModel(), ours.timesteps, step_kwargs=dict(eta=0.8), noise_seed=9,
               per_sample_generators=True, what="DDIM generator list")


def test_parity_given_variance_noise():
    ours, (lo, exact) = DDIMScheduler(), twins(diffusers.DDIMScheduler)
    set_all((ours, lo, exact), 10)
    x = start_sample()
    for t in ours.timesteps:
        m, noise = FakeModel()(x, t), start_sample(seed=int(t) + 1)
        mine = ours.step(m, t, x, eta=0.7, variance_noise=noise).prev_sample
        theirs = lo.step(m, t, x, eta=0.7, variance_noise=noise).prev_sample
        ref = exact.step(m.double(), t, x.double(), eta=0.7, variance_noise=noise.double()).prev_sample
        check(mine, theirs, ref, f"DDIM variance_noise t={int(t)}")
        x = mine


@pytest.mark.parametrize("name", ["default", "eta1-v-trailing-zero_snr", "threshold-clipped_output-v"])
def test_float64_matches_diffusers_float64(name):
    config, kwargs = CASES[name]
    ours, theirs = DDIMScheduler(**config), twins(diffusers.DDIMScheduler, **config)
    set_all((ours, *theirs), 10)
    run_parity(ours, theirs, FakeModel(dtype=torch.float64), ours.timesteps, step_kwargs=kwargs,
               noise_seed=3 if kwargs.get("eta", 0) > 0 else None, x=start_sample(dtype=torch.float64),
               rtol=1e-11, atol=1e-11, cond=1e-14, slack=False, what=f"DDIM float64 {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_diffusers_error(dtype):
    ours, lo = DDIMScheduler(), diffusers.DDIMScheduler()
    _, exact = twins(diffusers.DDIMScheduler)
    set_all((ours, lo, exact), 10)
    for t in ours.timesteps:
        x = start_sample(seed=int(t)).to(dtype)
        m = FakeModel()(x.float(), t).to(dtype)
        z = start_sample(seed=int(t) + 1).to(dtype)
        mine = ours.step(m, t, x, eta=0.5, variance_noise=z)
        theirs = lo.step(m, t, x, eta=0.5, variance_noise=z)
        ref = exact.step(m.double(), t, x.double(), eta=0.5, variance_noise=z.double())
        assert mine.prev_sample.dtype == dtype
        for field in ("prev_sample", "pred_original_sample"):
            assert_within_ref_error(getattr(mine, field), getattr(theirs, field), getattr(ref, field),
                                    f"DDIM {dtype} t={int(t)} {field}")


def test_mixed_dtypes_promote_like_diffusers():
    ours, lo = DDIMScheduler(), diffusers.DDIMScheduler()
    _, exact = twins(diffusers.DDIMScheduler)
    set_all((ours, lo, exact), 10)
    x, m = start_sample(), FakeModel(dtype=torch.float16)(start_sample(), 501)
    mine, theirs = ours.step(m, 501, x), lo.step(m, 501, x)
    ref = exact.step(m.double(), 501, x.double())
    assert mine.prev_sample.dtype == theirs.prev_sample.dtype == torch.float32
    assert_within_ref_error(mine.prev_sample, theirs.prev_sample, ref.prev_sample, "DDIM mixed dtypes")


def test_channels_last_gives_identical_results():
    sched = DDIMScheduler(thresholding=True)
    sched.set_timesteps(10)
    x, m = start_sample(), FakeModel()(start_sample(), 501)
    plain = sched.step(m, 501, x, eta=1.0, generator=gen(0))
    cl = sched.step(m.to(memory_format=torch.channels_last), 501, x.to(memory_format=torch.channels_last),
                    eta=1.0, generator=gen(0))
    strided = torch.cat([m, m], dim=-1)[..., :m.shape[-1]]  # not contiguous
    assert not strided.is_contiguous()
    mixed = sched.step(strided, 501, x.to(memory_format=torch.channels_last), eta=1.0, generator=gen(0))
    for other in (cl, mixed):
        assert torch.equal(plain.prev_sample, other.prev_sample)
        assert torch.equal(plain.pred_original_sample, other.pred_original_sample)


def test_outputs_and_one_fused_call_per_step(monkeypatch):
    calls = count_fused_calls(monkeypatch)
    sched = DDIMScheduler()
    sched.set_timesteps(10)
    x = start_sample()
    out = sched.step(FakeModel()(x, 901), 901, x, eta=1.0, generator=gen(0))
    assert isinstance(out, SchedulerOutput) and calls[0] == 1
    prev, x0 = sched.step(FakeModel()(x, 901), 901, x, eta=1.0, generator=gen(0), return_dict=False)
    assert torch.equal(prev, out.prev_sample) and torch.equal(x0, out.pred_original_sample)
    assert calls[0] == 2
    thresholded = DDIMScheduler(thresholding=True)
    thresholded.set_timesteps(10)
    thresholded.step(FakeModel()(x, 901), 901, x, eta=1.0, generator=gen(0))
    assert calls[0] == 3  # dynamic thresholding is inside the one fused call


def test_reference_backend_agrees():
    runs = []
    for backend in ("fused", "ref"):
        with use_backend(backend):
            sched = DDIMScheduler(prediction_type="v_prediction")
            sched.set_timesteps(10)
            x, g = start_sample(), gen(2)
            for t in sched.timesteps:
                x = sched.step(FakeModel()(x, t), t, x, eta=0.5, generator=g).prev_sample
            runs.append(x)
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-6)


def test_add_noise_and_velocity_match():
    config = dict(rescale_betas_zero_snr=True, beta_schedule="scaled_linear")
    ours, theirs = DDIMScheduler(**config), diffusers.DDIMScheduler(**config)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=1e-6, atol=0)
    x0, noise, t = start_sample(seed=1), start_sample(seed=2), torch.tensor([3, 998])
    for name in ("add_noise", "get_velocity"):
        torch.testing.assert_close(getattr(ours, name)(x0, noise, t), getattr(theirs, name)(x0, noise, t),
                                   rtol=1e-6, atol=1e-7, msg=name)


SPACINGS = st.sampled_from(["linspace", "leading", "trailing"])


@given(T=st.sampled_from([1000, 999, 64]), n=st.integers(1, 70), spacing=SPACINGS,
       offset=st.integers(0, 2))
def test_timesteps_match(T, n, spacing, offset):
    n = min(n, T)
    config = dict(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    ours, theirs = DDIMScheduler(**config), diffusers.DDIMScheduler(**config)
    set_all((ours, theirs), n)
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.timesteps.dtype == torch.int64


# -- errors ------------------------------------------------------------------------------------
both_raise = raises_in_both(DDIMScheduler)


def test_errors_shared_with_diffusers():
    x = start_sample()
    both_raise(NotImplementedError, lambda c: c(beta_schedule="sigmoid"))
    both_raise(ValueError, lambda c: c().step(x, 901, x))  # before set_timesteps
    both_raise(ValueError, lambda c: ready(c, prediction_type="flow").step(x, 901, x))
    both_raise(ValueError, lambda c: c(timestep_spacing="uniform").set_timesteps(10))
    both_raise(ValueError, lambda c: c().set_timesteps(1001))
    both_raise(ValueError, lambda c: ready(c).step(x, 901, x, eta=1.0, generator=gen(0), variance_noise=x))


def test_errors_where_diffusers_fails_silently_or_obscurely():
    x = start_sample()
    with pytest.raises(ValueError, match="outside"):
        ready(DDIMScheduler).step(x, -5, x)
    with pytest.raises(ValueError, match="outside"):
        ready(DDIMScheduler).step(x, 1000, x)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        ready(DDIMScheduler, rescale_betas_zero_snr=True, timestep_spacing="trailing").step(x, 999, x)
    with pytest.raises(TypeError, match="integer"):
        DDIMScheduler().set_timesteps(2.5)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ready(DDIMScheduler).step(x.numpy(), 901, x)
    with pytest.raises(ValueError, match="shape"):
        ready(DDIMScheduler).step(x, 901, x, eta=1.0, variance_noise=x[:1])


def test_zero_snr_first_step_stays_finite():
    """At alpha-bar_t = 0 with eta = 1, 1 - abar_prev - sigma^2 is 0 and may round below it: diffusers
    can take the square root of a tiny negative number (NaN); the coefficient clamps it at 0."""
    sched = ready(DDIMScheduler, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                  timestep_spacing="trailing", set_alpha_to_one=False)
    x = start_sample()
    out = sched.step(FakeModel()(x, 999), 999, x, eta=1.0, generator=gen(0))
    assert torch.isfinite(out.prev_sample).all() and torch.isfinite(out.pred_original_sample).all()
