"""Driver of the multistep-solver tests: a fusediff scheduler against diffusers' on whole runs.

Three schedulers step through one schedule: ours; diffusers' as shipped (``lo``, float32 sigmas,
float32 arithmetic) on the same inputs; and ``exact``, a diffusers twin whose sigmas are float64 and
which computes in float64 (:func:`in_float64`: DPM-Solver's step casts the sample to float32 through
the module's ``torch.float32``, which the twin sees as float64; its noise is still drawn in float32,
then cast). Every step gives all three the same input (our previous output) and the same fake model
output, while each keeps its own history of converted outputs (x0 or eps), so a comparison measures
one step's rounding, history included.

The bound per element is that of ``parity.check``: |ours - exact| <= 2 |lo - exact| + rtol |exact|
+ atol + COND * size, with size the sum of the absolute terms our fused op adds (recorded from our
calls): diffusers computes the coefficients in float32, where (e^-h - 1 + h)/h^2 - 1/2 and DEIS's
log-rho integrals cancel, so its own error is the scale; ours (float64 coefficients, float32 sums)
is held to twice it or to a few roundings of the terms it sums. The converted outputs
(``model_outputs[-1]``) are compared as well as the samples.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import types
from unittest import mock

import diffusers
import pytest
import torch
from schedulers import parity
from schedulers.parity import FakeModel, check, gen, start_sample, states
from support.tolerance import assert_within_ref_error

RTOL, ATOL = 1e-6, 1e-6
COND = 1e-6  # ~16 float32 unit roundoffs of the terms summed


def twins(cls, num_steps: int | None = None, **config):
    """diffusers' ``cls`` as shipped and its float64 twin; ``set_timesteps(num_steps)`` on both if given."""
    lo, exact = cls(**config), cls(**config)
    if num_steps is not None:
        set_all((lo, exact), num_steps)
    return lo, exact


def prepare(ours_cls, config: dict, num_steps: int):
    """(ours, (lo, exact)): fusediff's ``ours_cls`` and diffusers' class of the same name (:func:`twins`)
    built from ``config``, ``num_steps`` set on all three."""
    ours, theirs = ours_cls(**config), twins(getattr(diffusers, ours_cls.__name__), **config)
    set_all((ours, *theirs), num_steps)
    return ours, theirs


def set_all(scheds, *args, **kwargs) -> None:
    """set_timesteps on each; diffusers' float64 twin (the second of a diffusers pair) gets float64 sigmas."""
    for s in scheds:
        s.set_timesteps(*args, **kwargs)
    widen(scheds[-1])


def widen(sched) -> None:
    """Make a diffusers scheduler hold float64 sigmas (the same values), so it computes in float64."""
    if type(sched).__module__.startswith("diffusers"):
        sched.sigmas = sched.sigmas.double()


@contextlib.contextmanager
def in_float64(sched):
    """Run diffusers' ``sched`` in float64: its module's ``torch.float32`` reads as float64, and its noise
    is drawn in float32 and cast, so that it draws the numbers the float32 run draws."""
    module = __import__(type(sched).__module__, fromlist=["_"])
    proxy = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    proxy.float32 = torch.float64
    patches = [mock.patch.object(module, "torch", proxy)]
    if hasattr(module, "randn_tensor"):
        real = module.randn_tensor

        def draw(shape, generator=None, device=None, dtype=None, **kwargs):
            return real(shape, generator=generator, device=device, dtype=torch.float32, **kwargs).to(dtype)
        patches.append(mock.patch.object(module, "randn_tensor", draw))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


def term_sizes():
    """parity.term_sizes, wrapping the fused op where the multistep schedulers call it."""
    import fusediff.schedulers.multistep_scheduler as base

    return parity.term_sizes(base)


def run_parity(ours, theirs, model: FakeModel | None = None, timesteps=None, *, x=None, noise_seed=None,
               what="", rtol=RTOL, atol=ATOL, cond=COND, slack=True):
    """Step ``ours`` and diffusers' ``theirs`` = (lo, exact) over ``timesteps`` (default: ours'); compare
    every step's sample and converted output. ``noise_seed`` gives each an identically seeded generator,
    which must end in the same state (the same draws). ``slack=False`` drops diffusers' own error from the
    bound (float64 inputs). Returns the last samples (ours, lo, exact)."""
    lo, exact = theirs
    model = FakeModel() if model is None else model
    timesteps = ours.timesteps if timesteps is None else timesteps
    x = start_sample() if x is None else x
    gens = [gen(noise_seed) if noise_seed is not None else None for _ in range(3)]
    kw = [{} if g is None else {"generator": g} for g in gens]
    outs = None
    for i, t in enumerate(timesteps):
        m = model(x, t)
        with term_sizes() as sizes:
            mine = ours.step(m, t, x, **kw[0]).prev_sample
        low = lo.step(m, t, x, **kw[1]).prev_sample
        with in_float64(exact):
            ref = exact.step(m.double(), t, x.double(), **kw[2]).prev_sample
        outs = (mine, low, ref)
        where = f"{what} step {i} (t={int(t)})"
        check(mine, low if slack else None, ref, f"{where}: prev_sample", rtol, atol, cond * sizes["out"])
        converted = [s.model_outputs[-1] for s in (ours, lo, exact)]
        check(converted[0], converted[1] if slack else None, converted[2], f"{where}: converted output", rtol, atol,
              cond * sizes["x0"])
        x = mine
    if noise_seed is not None:
        for a, b in zip(states(gens[0]), states(gens[1])):
            assert torch.equal(a, b), f"{what}: fusediff drew a different amount of noise than diffusers"
    return outs


def assert_same_schedule(ours, theirs) -> None:
    """Timesteps equal (values and int64) and sigmas equal bit for bit (float32)."""
    assert ours.timesteps.dtype == theirs.timesteps.dtype == torch.int64
    assert torch.equal(ours.timesteps, theirs.timesteps), (ours.timesteps.tolist(), theirs.timesteps.tolist())
    assert ours.sigmas.dtype == torch.float32
    assert torch.equal(ours.sigmas, theirs.sigmas.float()), (ours.sigmas - theirs.sigmas.float()).abs().max()


def run_from_begin_index(ours, theirs, begin: int, what: str, run=run_parity) -> None:
    """An img2img entry: ``set_begin_index(begin)`` on all three, x0 noised to that timestep (ours' add_noise
    against diffusers'), then ``run`` (default :func:`run_parity`) over the rest of the schedule."""
    lo, exact = theirs
    for s in (ours, lo, exact):
        s.set_begin_index(begin)
    x0, noise = start_sample(seed=1), start_sample(seed=2)
    t0 = ours.timesteps[begin:begin + 1]
    x = ours.add_noise(x0, noise, t0)
    torch.testing.assert_close(x, lo.add_noise(x0, noise, t0), rtol=1e-6, atol=1e-7)
    run(ours, (lo, exact), timesteps=ours.timesteps[begin:], x=x, what=what)


def run_float64(ours, theirs, what: str, run=run_parity, **kwargs) -> None:
    """Float64 inputs held to float64 accuracy against diffusers' float64 twin (rtol = atol = 1e-10, cond 1e-13,
    no slack for diffusers' own error) by ``run`` (default :func:`run_parity`, given ``kwargs``); prints the
    largest difference of the last samples."""
    mine, _, ref = run(ours, theirs, FakeModel(dtype=torch.float64), x=start_sample(dtype=torch.float64),
                       rtol=1e-10, atol=1e-10, cond=1e-13, slack=False, what=what, **kwargs)
    assert mine.dtype == torch.float64
    print(f"{what}: float64 max |ours - diffusers float64| = {(mine - ref).abs().max().item():.2e}")


def run_half(ours, theirs, dtype: torch.dtype, what: str = "", model=None) -> None:
    """Half-precision samples: ours within twice diffusers' own error (+ the dtype's atol) of the float64 twin.

    Each scheduler steps the same ``dtype`` sample (our previous output); ``model(x, t)`` gives the model
    output (default: ``FakeModel(dtype=dtype)(x, t)``).
    """
    lo, exact = theirs
    model = (lambda x, t: FakeModel(dtype=dtype)(x, t)) if model is None else model
    x = start_sample().to(dtype)
    for t in ours.timesteps:
        m = model(x, t)
        mine, low = ours.step(m, t, x).prev_sample, lo.step(m, t, x).prev_sample
        with in_float64(exact):
            ref = exact.step(m.double(), t, x.double()).prev_sample
        assert mine.dtype == dtype
        assert_within_ref_error(mine, low, ref, f"{what}{dtype} t={int(t)}")
        x = mine


# -- configs -----------------------------------------------------------------------------------
def plain(config) -> dict:
    """A config without bookkeeping keys, as JSON types."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def assert_signature_and_defaults_match(ours_cls, defaults_as_json: bool = False) -> None:
    """Constructor arguments and defaults, and the default config, equal to diffusers' class of the same name.
    ``defaults_as_json`` compares the defaults as JSON (a default () of ours equals diffusers' [])."""
    theirs_cls = getattr(diffusers, ours_cls.__name__)

    def params(cls):
        return [(p.name, json.dumps(p.default) if defaults_as_json else p.default)
                for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    assert params(ours_cls) == params(theirs_cls)
    assert plain(ours_cls().config) == plain(theirs_cls().config)


def assert_round_trip_both_ways(tmp_path, ours_cls, config: dict):
    """Ours saved with ``config`` loads in diffusers, and diffusers' in ours, with equal configs and the same
    12-step schedule. Returns (ours, diffusers' loaded, ours loaded) for further checks."""
    theirs_cls = getattr(diffusers, ours_cls.__name__)
    ours = ours_cls(**config)
    ours.save_pretrained(tmp_path / "a")
    theirs = theirs_cls.from_pretrained(tmp_path / "a")
    assert plain(theirs.config) == plain(ours.config)
    theirs_cls(**config).save_pretrained(tmp_path / "b")
    again = ours_cls.from_pretrained(tmp_path / "b")
    assert plain(again.config) == plain(ours.config)
    set_all((again, theirs), 12)
    assert_same_schedule(again, theirs)
    return ours, theirs, again


def assert_from_config_like_diffusers(ours_cls, config):
    """``from_config(config)`` (another scheduler's) gives ours the config diffusers' gets, on our keys, and the
    same 10-step schedule. Returns ours."""
    theirs_cls = getattr(diffusers, ours_cls.__name__)
    ours, theirs = ours_cls.from_config(config), theirs_cls.from_config(config)
    keys = set(plain(ours_cls().config))
    assert {k: v for k, v in plain(ours.config).items() if k in keys} == \
        {k: v for k, v in plain(theirs.config).items() if k in keys}
    set_all((ours, theirs), 10)
    assert_same_schedule(ours, theirs)
    return ours


# -- errors ------------------------------------------------------------------------------------
def assert_errors_shared_with_diffusers(both_raise) -> None:
    """The errors every multistep scheduler raises as diffusers' does (``both_raise`` from parity.raises_in_both)."""
    x = start_sample()
    both_raise(ValueError, lambda c: c().step(x, 999, x))  # before set_timesteps
    both_raise(NotImplementedError, lambda c: c(beta_schedule="sigmoid"))
    both_raise(NotImplementedError, lambda c: c(solver_type="rk4"))
    both_raise(ValueError, lambda c: c(use_karras_sigmas=True, use_exponential_sigmas=True))
    both_raise(ValueError, lambda c: c(timestep_spacing="uniform").set_timesteps(10))


def assert_step_errors(cls) -> None:
    """A timestep not in the schedule, a model output of another shape, and a step after the last."""
    x = start_sample()
    with pytest.raises(ValueError, match="not in the schedule"):
        parity.ready(cls).step(x, 998, x)
    with pytest.raises(ValueError, match="shape"):
        s = parity.ready(cls)
        s.step(x[:1], s.timesteps[0], x)
    with pytest.raises(ValueError, match="is over"):
        s = parity.ready(cls, n=1)
        s.step(x, s.timesteps[0], x)
        s.step(x, s.timesteps[0], x)
