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
import types
from unittest import mock

import torch
from schedulers.parity import FakeModel, check, gen, start_sample, states

from fusediff.kernels import scheduler_step_ref

RTOL, ATOL = 1e-6, 1e-6
COND = 1e-6  # ~16 float32 unit roundoffs of the terms summed


def twins(cls, num_steps: int | None = None, **config):
    """diffusers' ``cls`` as shipped and its float64 twin; ``set_timesteps(num_steps)`` on both if given."""
    lo, exact = cls(**config), cls(**config)
    if num_steps is not None:
        set_all((lo, exact), num_steps)
    return lo, exact


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


@contextlib.contextmanager
def term_sizes():
    """Record, per element, the sizes of the terms our fused op sums: {"out": ..., "x0": ...} (float64),
    the element-wise maximum over the calls of a step (thresholding makes several)."""
    import fusediff.schedulers.scheduling_multistep_utils as base

    real = base.scheduler_step
    sizes: dict[str, torch.Tensor | None] = {"out": None, "x0": None}

    def recording(sample, model_output, coeffs, *, noise=None, history=(), **kwargs):
        def a(t):
            return None if t is None else t.double().abs()
        c = [abs(float(v)) for v in coeffs][:11] + [0.0]
        out, x0 = scheduler_step_ref(a(sample), a(model_output), c, noise=a(noise), history=[a(h) for h in history],
                                     return_pred=True)
        for key, value in (("out", out), ("x0", x0)):
            sizes[key] = value if sizes[key] is None else torch.maximum(sizes[key], value)
        return real(sample, model_output, coeffs, noise=noise, history=history, **kwargs)

    with mock.patch.object(base, "scheduler_step", recording):
        yield sizes


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
