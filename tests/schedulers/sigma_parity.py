"""Shared driver of the sigma-scheduler tests (Euler, Euler ancestral, Heun, LMS) against diffusers.

As in parity.py, three schedulers step through a whole run: ours; diffusers' as shipped (``lo``);
and ``exact``, diffusers' with float64 sigma tables run on the inputs cast to float64 with the same
noise (drawn in the inputs' dtype, then cast). Every step all three get the same sample (our
previous output) and the same fake model output, so each comparison measures one step's rounding
while each scheduler's own state (Heun's first stage, LMS' derivatives, the noise streams, the step
index) runs through the whole schedule. Changes for these schedulers:

- calls come in a pipeline's order: ``scale_model_input``, the model (on our scaled input), ``step``;
  the scaled inputs are compared too.
- diffusers' Euler and Euler ancestral round the sample to float32 inside ``step``; ``exact`` runs
  with that cast made a float64 one, so that it is a float64 reference.

The bound per element is parity.check's: |ours - exact| <= 2 |lo - exact| + rtol |exact| + atol +
COND * (sum of the absolute terms our fused op adds up). ``rtol`` = 1e-5 covers the float32
coefficients: diffusers forms sigma_hat, sigma_up, dt, the LMS integrals in float32 (relative error
~1e-7 each, ~1e-6 after the cancellation in sigma_down), ours are float64.
"""

from __future__ import annotations

import contextlib
import sys
from unittest import mock

import diffusers
import diffusers.schedulers.scheduling_ddpm as diffusers_ddpm
import diffusers.schedulers.scheduling_euler_ancestral_discrete as diffusers_euler_a
import diffusers.schedulers.scheduling_euler_discrete as diffusers_euler
import numpy as np
import pytest
import torch
from schedulers import parity
from schedulers.parity import ATOL, COND, RTOL, FakeModel, check, gen, start_sample, states

import fusediff.schedulers.fused_step as utils
import fusediff.schedulers.sigma_scheduler as sigma_utils

SHAPE = parity.SHAPE


def prepare(ours_cls, config: dict, num_steps: int | None = None, **set_kwargs):
    """(ours, (lo, exact)) built from ``config`` with the run set (``num_steps`` or ``set_kwargs``);
    asserts that ours has diffusers' timesteps and sigmas exactly."""
    theirs_cls = getattr(diffusers, ours_cls.__name__)
    ours, lo, exact = ours_cls(**config), theirs_cls(**config), theirs_cls(**config)
    for s in (ours, lo, exact):
        s.set_timesteps(num_steps, **set_kwargs)
    same_tables(ours, lo, f"{ours_cls.__name__} {config} {num_steps} {set_kwargs}")
    exact.sigmas = exact.sigmas.double()
    return ours, (lo, exact)


def same_tables(ours, theirs, what: str = "") -> None:
    for name in ("timesteps", "sigmas"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a.dtype == b.dtype and a.shape == b.shape, (what, name, a.dtype, b.dtype, a.shape, b.shape)
        if not torch.equal(a, b):
            i = int((a != b).nonzero()[0])
            raise AssertionError(f"{what}: {name} differ first at {i}: ours {a[i].item()!r}, diffusers {b[i].item()!r}")


class _TorchUpcastingTo64:
    """A stand-in for a diffusers module's ``torch`` in which ``float32`` names float64."""

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


@contextlib.contextmanager
def float64_upcast(sched):
    """Make the upcast ``sample.to(torch.float32)`` in ``sched``'s diffusers module a float64 cast."""
    with mock.patch.object(sys.modules[type(sched).__module__], "torch", _TorchUpcastingTo64()):
        yield


@contextlib.contextmanager
def noise_drawn_in(dtype: torch.dtype):
    """parity.noise_drawn_in, extended to diffusers' Euler modules."""
    with parity.noise_drawn_in(dtype):
        draw = diffusers_ddpm.randn_tensor  # parity's drawing function while its patch is active
        with mock.patch.object(diffusers_euler, "randn_tensor", draw), \
                mock.patch.object(diffusers_euler_a, "randn_tensor", draw):
            yield


@contextlib.contextmanager
def term_sizes():
    """parity.term_sizes, seeing the fused calls of the sigma schedulers too."""
    with parity.term_sizes() as sizes:
        with mock.patch.object(sigma_utils, "scheduler_step", utils.scheduler_step):  # the recording wrapper
            yield sizes


def count_fused_calls(monkeypatch) -> list[int]:
    """parity.count_fused_calls, counting the sigma schedulers' fused calls too."""
    calls = parity.count_fused_calls(monkeypatch)
    monkeypatch.setattr(sigma_utils, "scheduler_step", utils.scheduler_step)  # the counting wrapper
    return calls


def initial_sample(sched, dtype=torch.float32, seed: int = 7) -> torch.Tensor:
    """Start noise at the run's scale: start_sample * init_noise_sigma (rounded to ``dtype``)."""
    return (start_sample(dtype=torch.float64, seed=seed) * float(sched.init_noise_sigma)).to(dtype)


def run_sigma_parity(ours, theirs, model: FakeModel, *, step_kwargs=None, our_kwargs=None, noise_seed=None,
                     per_sample_generators=False, x=None, start: int = 0, what="", rtol=RTOL, atol=ATOL,
                     cond=COND, slack=True):
    """Step ours and diffusers' ``theirs`` = (lo, exact) over ``ours.timesteps[start:]``; compare every step.

    ``noise_seed`` gives each scheduler an identically seeded generator (one per batch element with
    ``per_sample_generators``); ours and lo must end in the same state, i.e. ours drew the same
    numbers. ``our_kwargs`` override step arguments for ours alone (to show that a test can fail).
    ``slack=False`` drops diffusers' own error from the bound (float64 inputs). Returns the last step's
    outputs (ours, lo, exact).
    """
    lo, exact = theirs
    scheds = (ours, lo, exact)
    step_kwargs = dict(step_kwargs or {})
    x = initial_sample(ours) if x is None else x
    gens = [None] * 3
    if noise_seed is not None:
        n = x.shape[0] if per_sample_generators else None
        gens = [gen(noise_seed, n) for _ in range(3)]
    kwargs = [step_kwargs if g is None else {**step_kwargs, "generator": g} for g in gens]
    kwargs[0] = {**kwargs[0], **(our_kwargs or {})}
    outs = None
    for i, t in enumerate(ours.timesteps[start:]):
        where = f"{what} call {start + i} (t={float(t):.4g})"
        xs = (x, x, x.double())
        scaled = [s.scale_model_input(xi, t) for s, xi in zip(scheds, xs)]
        check(scaled[0], scaled[1], scaled[2], f"{where}: scale_model_input", rtol, atol)
        m = model(scaled[0], t)
        ms = (m, m, m.double())
        with term_sizes() as sizes:
            mine = ours.step(ms[0], t, xs[0], **kwargs[0])
        theirs_lo = lo.step(ms[1], t, xs[1], **kwargs[1])
        with noise_drawn_in(m.dtype), float64_upcast(exact):
            ref = exact.step(ms[2], t, xs[2], **kwargs[2])
        outs = (mine, theirs_lo, ref)
        for field, size in (("prev_sample", sizes["out"]), ("pred_original_sample", sizes["x0"])):
            values = [getattr(o, field) for o in outs]
            check(values[0], values[1] if slack else None, values[2], f"{where}: {field}", rtol, atol, cond * size)
        x = mine.prev_sample
    for s in scheds:
        assert s.step_index == len(ours.timesteps), (what, s.step_index, len(ours.timesteps))
    if noise_seed is not None:
        for a, b in zip(states(gens[0]), states(gens[1])):
            assert torch.equal(a, b), f"{what}: fusediff drew a different amount of noise than diffusers"
    return outs


def run_float64(ours_cls, config: dict, num_steps: int, what: str, tol: float, **kwargs):
    """Float64 inputs (start_sample * 14) held to float64 accuracy against diffusers' float64 twin: rtol = atol =
    ``tol``, cond 1e-14, no slack for diffusers' own error. ``kwargs`` go to run_sigma_parity; returns its result."""
    ours, theirs = prepare(ours_cls, config, num_steps)
    return run_sigma_parity(ours, theirs, FakeModel(dtype=torch.float64), x=start_sample(dtype=torch.float64) * 14,
                            rtol=tol, atol=tol, cond=1e-14, slack=False, what=what, **kwargs)


def run_img2img(ours_cls, config: dict, num_steps: int, strength: float, *, step_kwargs=None, noise_seed=None,
                set_begin: bool = True, what: str = ""):
    """A run entered mid-schedule, as diffusers' img2img pipelines enter it: the first
    ``order * int(n * strength)`` calls are skipped, x0 is noised to the first remaining timestep with
    ``add_noise`` (compared with diffusers'), and the rest of the run is compared step by step."""
    ours, theirs = prepare(ours_cls, config, num_steps)
    start = ours.order * (num_steps - int(num_steps * strength))
    if set_begin:
        for s in (ours, *theirs):
            s.set_begin_index(start)
    x0, noise = start_sample(seed=11), start_sample(seed=12)
    t0 = ours.timesteps[start:start + 1].repeat(SHAPE[0])
    x_ours, x_lo = ours.add_noise(x0, noise, t0), theirs[0].add_noise(x0, noise, t0)
    x_exact = theirs[1].add_noise(x0.double(), noise.double(), t0)
    check(x_ours, x_lo, x_exact, f"{what}: add_noise")
    return run_sigma_parity(ours, theirs, FakeModel(), x=x_ours, start=start, step_kwargs=step_kwargs,
                            noise_seed=noise_seed, what=what)


def run_half(ours_cls, config: dict, dtype: torch.dtype, num_steps: int = 8, step_kwargs=None, noise_seed=None):
    """A half-precision run: ours within twice the error of diffusers' run in ``dtype`` (house rule).

    Each scheduler runs its own chain on ``dtype`` inputs (the reference in float64); the model sees
    our sample. Returns the last prev_sample of ours.
    """
    from support.tolerance import assert_within_ref_error

    ours, (lo, exact) = prepare(ours_cls, config, num_steps)
    x = initial_sample(ours, dtype)
    xs = [x, x, x.double()]
    gens = [None] * 3 if noise_seed is None else [gen(noise_seed) for _ in range(3)]
    kwargs = [dict(step_kwargs or {}, **({} if g is None else {"generator": g})) for g in gens]
    for i, t in enumerate(ours.timesteps):
        m = FakeModel(dtype=dtype)(ours.scale_model_input(xs[0], t).float(), t)
        lo.scale_model_input(xs[1], t)
        exact.scale_model_input(xs[2], t)
        mine = ours.step(m, t, xs[0], **kwargs[0])
        theirs = lo.step(m, t, xs[1], **kwargs[1])
        with noise_drawn_in(dtype), float64_upcast(exact):
            ref = exact.step(m.double(), t, xs[2], **kwargs[2])
        assert mine.prev_sample.dtype == theirs.prev_sample.dtype == dtype
        for field in ("prev_sample", "pred_original_sample"):
            assert_within_ref_error(getattr(mine, field), getattr(theirs, field), getattr(ref, field),
                                    f"{ours_cls.__name__} {dtype} call {i} {field}")
        xs = [mine.prev_sample, mine.prev_sample, mine.prev_sample.double()]
    return xs[0]


def assert_configs_interchange(tmp_path, ours_cls, config: dict) -> None:
    """Our saved config loads in diffusers and diffusers' in ours, with equal configs and tables."""
    theirs_cls = getattr(diffusers, ours_cls.__name__)
    ours = ours_cls(**config)
    ours.save_pretrained(tmp_path / "ours")
    loaded_theirs = theirs_cls.from_pretrained(tmp_path / "ours")
    theirs = theirs_cls(**config)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded_ours = ours_cls.from_pretrained(tmp_path / "theirs")
    for a, b, what in ((ours, loaded_theirs, "ours -> diffusers"), (loaded_ours, theirs, "diffusers -> ours")):
        assert plain(a.config) == plain(b.config), what
        for s in (a, b):
            s.set_timesteps(9)
        same_tables(a, b, what)


def plain(config) -> dict:
    """A config without bookkeeping keys, lists for arrays."""
    return {k: (np.asarray(v).tolist() if isinstance(v, (np.ndarray, tuple)) else v)
            for k, v in dict(config).items() if not k.startswith("_")}


def assert_signature_matches(ours_cls) -> None:
    """Same constructor arguments and defaults, config, order and init_noise_sigma as diffusers'."""
    import inspect

    theirs_cls = getattr(diffusers, ours_cls.__name__)

    def params(cls):
        return [(p.name, p.default) for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]

    assert params(ours_cls) == params(theirs_cls)
    ours, theirs = ours_cls(), theirs_cls()
    assert plain(ours.config) == plain(theirs.config)
    assert ours.order == theirs.order and len(ours) == len(theirs)
    assert float(ours.init_noise_sigma) == float(theirs.init_noise_sigma)
    same_tables(ours, theirs, f"{ours_cls.__name__} before set_timesteps")


def assert_from_config_like_diffusers(ours_cls, source, num_steps: int, what: str, back_cls, all_keys: bool = False):
    """``from_config(source.config)`` (another scheduler, diffusers') gives ours diffusers' config (on diffusers'
    keys, or on all of ours with ``all_keys``) and tables after ``set_timesteps(num_steps)``. Returns ours and
    ``back_cls.from_config(ours.config)``, the swap back."""
    ours = ours_cls.from_config(source.config)
    theirs = getattr(diffusers, ours_cls.__name__).from_config(source.config)
    if all_keys:
        assert plain(ours.config) == plain(theirs.config)
    else:
        assert {k: v for k, v in plain(ours.config).items() if k in theirs.config} == plain(theirs.config)
    for s in (ours, theirs):
        s.set_timesteps(num_steps)
    same_tables(ours, theirs, what)
    return ours, back_cls.from_config(ours.config)


def assert_step_refusals(ours_cls, num_steps: int, off_schedule: float):
    """A scheduler of ``ours_cls`` with ``num_steps`` set refuses a timestep not in its schedule, then runs to the
    end and refuses a step after the last. Returns the scheduler."""
    x = start_sample()
    sched = ours_cls()
    sched.set_timesteps(num_steps)
    with pytest.raises(ValueError, match="not in the schedule"):
        sched.step(x, off_schedule, x)
    for t in sched.timesteps:
        sched.step(x, t, x)
    with pytest.raises(ValueError, match="has ended"):
        sched.step(x, sched.timesteps[-1], x)
    return sched


def assert_unsupported_options_refused(ours_cls) -> None:
    """Beta sigmas and flow prediction, which diffusers accepts, are refused by name."""
    with pytest.raises(NotImplementedError, match="use_beta_sigmas"):
        ours_cls(use_beta_sigmas=True)
    with pytest.raises(ValueError, match="prediction_type"):
        ours_cls(prediction_type="flow")
