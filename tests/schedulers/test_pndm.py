"""fusediff's PNDMScheduler against diffusers' on whole runs (PRK warm-up then PLMS, and PLMS only),
its running state, dtypes and errors."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from schedulers.parity import (FakeModel, count_fused_calls, raises_in_both, ready, run_parity, set_all, start_sample,
                               twins)
from support.tolerance import assert_within_ref_error

from fusediff.kernels import use_backend
from fusediff.schedulers import PNDMScheduler, SchedulerOutput

CONFIGS = {
    "prk": {},
    "plms-scaled_linear-offset": dict(skip_prk_steps=True, beta_schedule="scaled_linear", steps_offset=1),
    "prk-v-trailing-alpha_one": dict(prediction_type="v_prediction", set_alpha_to_one=True,
                                     timestep_spacing="trailing"),
    "plms-v-linspace": dict(skip_prk_steps=True, prediction_type="v_prediction", timestep_spacing="linspace"),
    "prk-cosine-linspace": dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace"),
    "plms-trained_betas-T200": dict(skip_prk_steps=True, num_train_timesteps=200,
                                    trained_betas=np.linspace(1e-4, 0.03, 200).tolist()),
}


def assert_same_state(ours, theirs, what):
    assert ours.counter == theirs.counter, what
    assert len(ours.ets) == len(theirs.ets), what
    assert (ours.cur_sample is None) == (theirs.cur_sample is None), what
    for mine, their in zip(ours.ets, theirs.ets):
        torch.testing.assert_close(mine, their, rtol=1e-5, atol=1e-5, msg=what)


@pytest.mark.parametrize("num_steps", [10, 50])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_run(name, num_steps):
    config = CONFIGS[name]
    ours, theirs = PNDMScheduler(**config), twins(diffusers.PNDMScheduler, **config)
    set_all((ours, *theirs), num_steps)
    assert torch.equal(ours.timesteps, theirs[0].timesteps)
    run_parity(ours, theirs, FakeModel(), ours.timesteps, what=f"PNDM {name} {num_steps} steps")
    assert_same_state(ours, theirs[0], name)


@pytest.mark.parametrize("skip_prk", [False, True], ids=["prk", "plms"])
@pytest.mark.parametrize("num_steps", [1, 2, 3, 4, 5])
def test_parity_short_runs(num_steps, skip_prk):
    """Short runs: PLMS-only from one step; PRK needs its four warm-up timesteps (diffusers fails below)."""
    ours, theirs = PNDMScheduler(skip_prk_steps=skip_prk), twins(diffusers.PNDMScheduler, skip_prk_steps=skip_prk)
    if num_steps < 4 and not skip_prk:
        for s in (ours, theirs[0]):
            with pytest.raises(ValueError):
                s.set_timesteps(num_steps)
        return
    set_all((ours, *theirs), num_steps)
    assert torch.equal(ours.timesteps, theirs[0].timesteps), (ours.timesteps, theirs[0].timesteps)
    run_parity(ours, theirs, FakeModel(), ours.timesteps, what=f"PNDM {num_steps} steps")


def test_state_after_every_call_and_reset():
    ours, theirs = PNDMScheduler(), diffusers.PNDMScheduler()
    finals = []
    for run in range(2):  # set_timesteps resets the running state: the second run repeats the first
        set_all((ours, theirs), 8)
        xs = [start_sample()] * 2
        for i, t in enumerate(ours.timesteps):
            xs = [s.step(FakeModel()(x, t), t, x).prev_sample for s, x in zip((ours, theirs), xs)]
            assert_same_state(ours, theirs, f"run {run} call {i}")
        finals.append(xs[0])
    assert torch.equal(finals[0], finals[1])


@pytest.mark.parametrize("name", ["prk", "plms-v-linspace", "prk-v-trailing-alpha_one"])
def test_float64_matches_diffusers_float64(name):
    config = CONFIGS[name]
    ours, theirs = PNDMScheduler(**config), twins(diffusers.PNDMScheduler, **config)
    set_all((ours, *theirs), 10)
    run_parity(ours, theirs, FakeModel(dtype=torch.float64), ours.timesteps, x=start_sample(dtype=torch.float64),
               rtol=1e-11, atol=1e-11, cond=1e-14, slack=False, what=f"PNDM float64 {name}")


@pytest.mark.parametrize("skip_prk", [False, True], ids=["prk", "plms"])
def test_half_precision_within_diffusers_error(skip_prk):
    """A float16 run: ours at most twice as far from a float64 run as diffusers' float16 run is."""
    ours, lo = PNDMScheduler(skip_prk_steps=skip_prk), diffusers.PNDMScheduler(skip_prk_steps=skip_prk)
    _, exact = twins(diffusers.PNDMScheduler, skip_prk_steps=skip_prk)
    set_all((ours, lo, exact), 10)
    model = FakeModel(dtype=torch.float16)
    x = start_sample(dtype=torch.float16)
    xs = [x, x, x.double()]
    for i, t in enumerate(ours.timesteps):
        # one model output for all three, so that only the schedulers' rounding differs
        m = model(xs[2], t)
        xs = [s.step(m.to(xk.dtype), t, xk).prev_sample for s, xk in zip((ours, lo, exact), xs)]
        assert xs[0].dtype == torch.float16
        assert_within_ref_error(xs[0], xs[1], xs[2], f"PNDM float16 call {i} t={int(t)}")


def test_mixed_dtypes_promote_like_diffusers():
    """A float16 model output on a float32 sample steps in float32; diffusers combines the float16
    history in float16, ours in float32, so ours is the closer one to a float64 run."""
    ours, lo = PNDMScheduler(skip_prk_steps=True), diffusers.PNDMScheduler(skip_prk_steps=True)
    _, exact = twins(diffusers.PNDMScheduler, skip_prk_steps=True)
    set_all((ours, lo, exact), 10)
    x = start_sample()
    for t in ours.timesteps:
        m = FakeModel(dtype=torch.float16)(x, t)
        a, b, ref = ours.step(m, t, x).prev_sample, lo.step(m, t, x).prev_sample, exact.step(m.double(), t, x.double())
        assert a.dtype == b.dtype == torch.float32
        assert_within_ref_error(a, b, ref.prev_sample, f"PNDM mixed dtypes t={int(t)}")
        x = a


def test_outputs_and_one_fused_call_per_step(monkeypatch):
    calls = count_fused_calls(monkeypatch)
    sched = PNDMScheduler()
    sched.set_timesteps(10)
    x = start_sample()
    for i, t in enumerate(sched.timesteps):
        out = sched.step(FakeModel()(x, t), t, x, return_dict=i % 2 == 0)
        assert calls[0] == i + 1
        if i % 2 == 0:
            assert isinstance(out, SchedulerOutput) and out.pred_original_sample is None
            x = out.prev_sample
        else:
            assert isinstance(out, tuple) and len(out) == 1
            x = out[0]


def test_reference_backend_agrees():
    runs = []
    for backend in ("fused", "ref"):
        with use_backend(backend):
            sched = PNDMScheduler()
            sched.set_timesteps(10)
            x = start_sample()
            for t in sched.timesteps:
                x = sched.step(FakeModel()(x, t), t, x).prev_sample
            runs.append(x)
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-5)


def test_add_noise_matches():
    ours, theirs = PNDMScheduler(), diffusers.PNDMScheduler()
    x0, noise, t = start_sample(seed=1), start_sample(seed=2), torch.tensor([0, 500])
    assert torch.equal(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t))


SPACINGS = st.sampled_from(["linspace", "leading", "trailing"])


@given(T=st.sampled_from([1000, 999, 64]), n=st.integers(1, 70), spacing=SPACINGS,
       offset=st.integers(0, 1), skip_prk=st.booleans())
def test_timesteps_match(T, n, spacing, offset, skip_prk):
    n = min(n, T) if skip_prk else max(min(n, T), 4)
    config = dict(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset, skip_prk_steps=skip_prk)
    ours, theirs = PNDMScheduler(**config), diffusers.PNDMScheduler(**config)
    set_all((ours, theirs), n)
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.timesteps.dtype == torch.int64
    for name in ("_timesteps", "prk_timesteps", "plms_timesteps"):
        assert np.array_equal(getattr(ours, name), getattr(theirs, name)), name


# -- errors ------------------------------------------------------------------------------------
both_raise = raises_in_both(PNDMScheduler)


def test_errors_shared_with_diffusers():
    x = start_sample()
    both_raise(NotImplementedError, lambda c: c(beta_schedule="laplace"))
    both_raise(ValueError, lambda c: ready(c, prediction_type="sample").step(x, 901, x))
    both_raise(ValueError, lambda c: ready(c).step_plms(x, 901, x))  # PLMS before the PRK warm-up
    both_raise(ValueError, lambda c: c(timestep_spacing="uniform").set_timesteps(10))


def test_errors_where_diffusers_fails_obscurely():
    x = start_sample()
    for skip_prk in (False, True):
        with pytest.raises(ValueError, match="set_timesteps"):
            PNDMScheduler(skip_prk_steps=skip_prk).step(x, 901, x)  # diffusers: TypeError on len(None)
    with pytest.raises(ValueError, match="exceeds num_train_timesteps"):
        PNDMScheduler().set_timesteps(1001)  # diffusers: a degenerate schedule
    sched = ready(PNDMScheduler, prediction_type="sample")
    with pytest.raises(ValueError):
        sched.step(x, 901, x)
    assert sched.counter == 0 and sched.ets == []  # a refused step leaves the state as it was
