"""Shared drivers of the scheduler tests: fusediff's scheduler against diffusers' on the same inputs.

A run steps three schedulers through a whole schedule: ours; diffusers' as shipped (``lo``), on
the same inputs; and ``exact``, a diffusers twin with float64 alpha-bar tables run on the inputs
cast to float64, with the same noise (drawn in the inputs' dtype, then cast). At every step all
three get the same input (our previous output) and the same fake model output, so each comparison
measures one step's rounding, while each scheduler's own state (PNDM's history, the noise
streams) runs through the whole schedule.

The rule, per element (after DESIGN.md's house rule: at most twice the reference's own error):

    |ours - exact| <= 2 |lo - exact| + rtol |exact| + atol + COND * size

where size is the sum of the absolute terms our fused op adds up (|c_x x| + |c_m m| + ...,
recorded from ours): those terms are rounded, and cancel badly where alpha-bar_t is tiny
(x0 = (x - sqrt(1 - abar) m) / sqrt(abar) at t = 999). diffusers' own error can be much larger
than ours where its float32 arithmetic cancels (1 - abar_t/abar_{t-1} at t = 1; PNDM's v to eps
conversion on the cosine schedule), which the first term allows.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import diffusers
import pytest
import torch

from fusediff.kernels import scheduler_step_ref

SHAPE = (2, 3, 7, 5)  # odd sizes
RTOL, ATOL = 1e-5, 1e-5
COND = 1e-6  # ~16 float32 unit roundoffs of the largest terms summed
TABLES = {"DDPMScheduler": ("alphas_cumprod", "one"),
          "DDIMScheduler": ("alphas_cumprod", "final_alpha_cumprod"),
          "PNDMScheduler": ("alphas_cumprod", "final_alpha_cumprod"),
          "UnCLIPScheduler": ("alphas_cumprod", "one", "betas", "alphas")}


def twins(cls, **config):
    """diffusers' scheduler as shipped (float32 tables), and a twin with float64 tables (for float64 runs)."""
    lo, hi = cls(**config), cls(**config)
    for name in TABLES[cls.__name__]:
        setattr(hi, name, getattr(hi, name).double())
    return lo, hi


def gen(seed: int = 0, n: int | None = None):
    """A seeded CPU generator, or a list of n of them (one per batch element)."""
    if n is None:
        return torch.Generator().manual_seed(seed)
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def states(g) -> list[torch.Tensor]:
    return [x.get_state() for x in (g if isinstance(g, list) else [g])]


class FakeModel:
    """m(x, t) = 0.9 * field_t + 0.1 * x, the field drawn once per timestep from a fixed seed.

    ``variance`` appends as many channels of a predicted variance (``"learned"``: small positive
    values; ``"learned_range"``: values in [-1, 1]).
    """

    def __init__(self, shape=SHAPE, dtype=torch.float32, variance: str | None = None, seed: int = 1234):
        self.shape, self.dtype, self.variance, self.seed = shape, dtype, variance, seed

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + int(t))
        field = torch.randn(self.shape, generator=g, dtype=torch.float64)
        m = (0.9 * field + 0.1 * x.double()).to(self.dtype)
        if self.variance is None:
            return m
        v = torch.randn(self.shape, generator=g, dtype=torch.float64)
        v = 1e-3 * torch.sigmoid(v) if self.variance == "learned" else torch.tanh(v)
        return torch.cat([m, v.to(self.dtype)], dim=1)


def start_sample(shape=SHAPE, dtype=torch.float32, seed: int = 7) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed), dtype=torch.float64).to(dtype)


def check(ours: torch.Tensor, lo: torch.Tensor | None, exact: torch.Tensor, what: str,
          rtol: float = RTOL, atol: float = ATOL, extra: torch.Tensor | float = 0.0) -> None:
    """ours against the float64 run ``exact``, allowing twice diffusers' own error (``lo``, if given).

    Where diffusers' own low-precision run is NaN and the float64 run is not (e.g. DDIM with eta=1
    at a zero-SNR first step, where it takes the square root of a rounding-negative 1 - abar - sigma^2),
    its error says nothing, and ours is held to rtol/atol alone. Prints the max difference and the
    worst element when the bound is exceeded.
    """
    if lo is not None:
        assert ours.shape == lo.shape and ours.dtype == lo.dtype, (what, ours.shape, ours.dtype, lo.shape, lo.dtype)
    ours, exact = ours.double(), exact.double()
    lo = exact if lo is None else lo.double()
    lo_nan = torch.isnan(lo) & ~torch.isnan(exact)
    if lo_nan.any():
        print(f"{what}: diffusers' low-precision run is NaN at {int(lo_nan.sum())} elements; plain tolerance there")
        lo = torch.where(lo_nan, exact, lo)
    diff = (ours - exact).abs()
    bound = 2 * (lo - exact).abs() + rtol * exact.abs() + atol + extra
    bad = ~(diff <= bound)  # NaN anywhere fails
    if bad.any():
        i = tuple(int(j) for j in torch.nonzero(bad)[(diff - bound)[bad].argmax()])
        raise AssertionError(
            f"{what}: not close at {int(bad.sum())} of {bad.numel()} elements; max |ours - exact| "
            f"{diff.max().item():.3e}, max |diffusers - exact| {(lo - exact).abs().max().item():.3e}; worst at {i}: "
            f"ours {ours[i].item():.8g}, diffusers {lo[i].item():.8g}, exact {exact[i].item():.8g}, "
            f"bound {bound[i].item():.3e}")


@contextlib.contextmanager
def noise_drawn_in(dtype: torch.dtype):
    """Make diffusers' schedulers draw their noise in ``dtype`` and cast it to the dtype they asked for."""
    import diffusers.schedulers.scheduling_ddim as ddim
    import diffusers.schedulers.scheduling_ddpm as ddpm
    import diffusers.schedulers.scheduling_unclip as unclip

    real = ddpm.randn_tensor

    def draw(shape, generator=None, device=None, dtype=None, **kwargs):
        return real(shape, generator=generator, device=device, dtype=draw_dtype, **kwargs).to(dtype)

    draw_dtype = dtype
    with mock.patch.object(ddpm, "randn_tensor", draw), mock.patch.object(ddim, "randn_tensor", draw), \
            mock.patch.object(unclip, "randn_tensor", draw):
        yield


@contextlib.contextmanager
def term_sizes(*modules):
    """Record, per element, the sizes of the terms our fused op sums: {"out": ..., "x0": ...} (float64).

    The fused op is wrapped where the schedulers call it (``modules``; default: the DDPM/DDIM/PNDM
    modules); each call also runs the reference on absolute values with absolute coefficients (no
    clip, the noise scaled by the variance input as the op scales it), and the element-wise maximum over
    the calls of a step is kept (the multistep solvers' thresholding makes several).
    """
    import fusediff.schedulers.fused_step as utils
    import fusediff.schedulers.scheduling_pndm as pndm

    modules = modules or (utils, pndm)
    real = modules[0].scheduler_step
    sizes: dict[str, torch.Tensor | None] = {"out": None, "x0": None}

    def recording(sample, model_output, coeffs, *, noise=None, history=(), **kwargs):
        def a(t):
            return None if t is None else t.double().abs()
        scaled = noise
        if kwargs.get("variance") is not None:  # the noise as the op scales it: exp(v_a + v_b*v) n
            scaled = noise.double() * torch.exp(float(coeffs[12]) + float(coeffs[13]) * kwargs["variance"].double())
        c = [abs(float(v)) for v in coeffs]
        c[11] = 0.0  # no clip
        out, x0 = scheduler_step_ref(a(sample), a(model_output), c, noise=a(scaled), history=[a(h) for h in history],
                                     return_pred=True)
        for key, value in (("out", out), ("x0", x0)):
            sizes[key] = value if sizes[key] is None else torch.maximum(sizes[key], value)
        return real(sample, model_output, coeffs, noise=noise, history=history, **kwargs)

    with contextlib.ExitStack() as stack:
        for module in modules:
            stack.enter_context(mock.patch.object(module, "scheduler_step", recording))
        yield sizes


def run_parity(ours, theirs, model: FakeModel, timesteps, *, step_kwargs=None, noise_seed=None,
               per_sample_generators=False, x=None, what="", rtol=RTOL, atol=ATOL, cond=COND, slack=True,
               per_step_kwargs=None):
    """Step fusediff's ``ours`` and diffusers' ``theirs`` = (lo, exact) over ``timesteps``; compare each step.

    ``noise_seed`` gives each scheduler an identically seeded generator (a list of them, one per
    batch element, with ``per_sample_generators``); ours and lo must end in the same state, i.e. ours
    drew the same numbers in the same order. ``per_step_kwargs(i)`` adds keyword arguments of step i
    (UnCLIPScheduler's ``prev_timestep``). ``slack=False`` drops diffusers' own error from the
    bound (for float64 inputs, where it measures diffusers' float32 tables, not rounding).
    Returns the last step's outputs (ours, lo, exact).
    """
    lo, exact = theirs
    step_kwargs = dict(step_kwargs or {})
    x = start_sample() if x is None else x
    gens = [None] * 3
    if noise_seed is not None:
        n = x.shape[0] if per_sample_generators else None
        gens = [gen(noise_seed, n) for _ in range(3)]

    outs = None
    for i, t in enumerate(timesteps):
        def kwargs(k, i=i):
            extra = {**step_kwargs, **(per_step_kwargs(i) if per_step_kwargs is not None else {})}
            return extra if gens[k] is None else {**extra, "generator": gens[k]}

        m = model(x, t)
        with term_sizes() as sizes:
            mine = ours.step(m, t, x, **kwargs(0))
        theirs_lo = lo.step(m, t, x, **kwargs(1))
        with noise_drawn_in(m.dtype):
            ref = exact.step(m.double(), t, x.double(), **kwargs(2))
        outs = (mine, theirs_lo, ref)
        where = f"{what} step {i} (t={int(t)})"
        for field, size in (("prev_sample", sizes["out"]), ("pred_original_sample", sizes["x0"])):
            values = [getattr(o, field, None) for o in outs]
            if values[1] is not None:
                check(values[0], values[1] if slack else None, values[2], f"{where}: {field}", rtol, atol,
                      cond * size)
        x = mine.prev_sample
    if noise_seed is not None:
        for a, b in zip(states(gens[0]), states(gens[1])):
            assert torch.equal(a, b), f"{what}: fusediff drew a different amount of noise than diffusers"
    return outs


def set_all(scheds, *args, **kwargs) -> None:
    for s in scheds:
        s.set_timesteps(*args, **kwargs)


def count_fused_calls(monkeypatch) -> list[int]:
    """Count calls of the fused op made by the schedulers (a one-element list, updated in place)."""
    import fusediff.schedulers.fused_step as utils
    import fusediff.schedulers.scheduling_pndm as pndm

    calls = [0]
    real = utils.scheduler_step

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(utils, "scheduler_step", counting)
    monkeypatch.setattr(pndm, "scheduler_step", counting)
    return calls


def raises_in_both(ours: type):
    """A check ``both_raise(exc, call)``: ``call(cls)`` raises ``exc`` for fusediff's scheduler class
    ``ours`` and for diffusers' class of the same name."""
    def both_raise(exc, call) -> None:
        for cls in (ours, getattr(diffusers, ours.__name__)):
            with pytest.raises(exc):
                call(cls)
    return both_raise


def ready(cls, n: int = 10, **config):
    """A scheduler of ``cls`` built from ``config`` with ``n`` (default 10) inference steps set."""
    sched = cls(**config)
    sched.set_timesteps(n)
    return sched
