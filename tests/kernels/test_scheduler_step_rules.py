"""Coefficient builders + fused scheduler step against HF diffusers' ``scheduler.step().prev_sample``.

For every update rule of kernels/scheduler_step_coeffs.py, each test drives a diffusers
scheduler and ``fusediff.kernels.scheduler_step`` with the same seeded random samples, model
outputs and noise, and compares every step's previous sample:

- DDPM: prediction and fixed variance types, clipping, linear and squaredcos_cap_v2 betas, the
  full chain (prev = t - 1) and a strided one (set_timesteps), down to t = 0 (no noise).
- DDIM: eta 0 / 0.5 / 1, clipping, use_clipped_model_output, set_alpha_to_one, leading and
  trailing spacing.
- Euler (with and without churn) and Euler ancestral, noise drawn as diffusers draws it.
- DPM-Solver++ 2M (midpoint, heun) over a whole run; fusediff keeps its own x0 history.
- PNDM: PLMS (with diffusers' counter == 1 step) and the PRK warm-up, step by step.

Each case runs on the C++ CPU path ("fused") and the PyTorch reference ("ref") in fp32, and on
fp64 inputs (the reference in fp64) as an upcast sanity check. A mismatched prediction type must
fail every driver, so the comparison is shown able to fail. Not covered: diffusers' learned
variances and dynamic thresholding, which are not coefficients (see scheduler_step_coeffs).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, PNDMScheduler)

from fusediff.kernels import scheduler_step, use_backend
from fusediff.kernels import scheduler_step_coeffs as sc

SHAPE = (2, 3, 7, 5)  # odd sizes
PREDS = ("epsilon", "sample", "v_prediction")
RTOL, ATOL = 1e-4, 1e-5
# diffusers' set_timesteps trips a numpy 2 deprecation on every call
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
MODES = {"fused-fp32": ("fused", torch.float32), "ref-fp32": ("ref", torch.float32),
         "ref-fp64": ("ref", torch.float64)}


@pytest.fixture(params=list(MODES))
def dtype(request):
    """Runs the test under one kernel backend; the dtype fusediff computes in."""
    backend, dtype = MODES[request.param]
    with use_backend(backend):
        yield dtype


def gens(k: int, seed: int = 0) -> list[torch.Generator]:
    """k identically seeded generators: the inputs', then one per consumer of noise."""
    return [torch.Generator().manual_seed(seed) for _ in range(k)]


def randn(g: torch.Generator) -> torch.Tensor:
    return torch.randn(SHAPE, generator=g, dtype=torch.float32)


def twins(cls, tables, num_steps=None, **config):
    """The diffusers scheduler as shipped (fp32 tables), and a twin whose ``tables`` are fp64.

    The twin still does its tensor arithmetic in fp32 (a 0-dim fp64 tensor does not promote
    an fp32 one); it only drops the rounding of the scalar coefficients, which is what makes
    diffusers' fp32 result ill-conditioned at places (e.g. DDPM's 1 - alpha_t/alpha_prev at t=1).
    """
    lo, hi = cls(**config), cls(**config)
    for sched in (lo, hi):
        if num_steps:
            sched.set_timesteps(num_steps)
    for name in tables:
        setattr(hi, name, getattr(hi, name).double())
    return lo, hi


def step(dtype, x, m, coeffs, noise=None, history=(), return_pred=False):
    """fusediff's fused step, its tensors cast to dtype."""
    return scheduler_step(x.to(dtype), m.to(dtype), coeffs, noise=None if noise is None else noise.to(dtype),
                          history=[h.to(dtype) for h in history], return_pred=return_pred)


def check(ours, lo, hi, what):
    """ours against diffusers per element, printing the worst element when it fails.

    lo is diffusers as shipped, hi its fp64-table twin. ours must be within RTOL |hi| + ATOL of
    hi, and within RTOL |lo| + ATOL + 2 |lo - hi| of lo: the house rule of DESIGN.md (at most
    twice the reference's own error) plus a relative term. |lo - hi| stays below 6e-7 of the
    output's magnitude except where diffusers' fp32 scalars cancel: DDPM at t = 1, where
    1 - alpha_1/alpha_0 ~ 1e-4 loses three digits (|lo - hi| up to 1.6e-4, 6e-5 of the magnitude).
    """
    ours, lo, hi = ours.double(), lo.double(), hi.double()
    own = 2 * (lo - hi).abs()
    for name, theirs, own in (("diffusers", lo, own), ("diffusers with fp64 tables", hi, 0.0)):
        diff = (ours - theirs).abs()
        bound = RTOL * theirs.abs() + ATOL + own
        bad = ~(diff <= bound)  # NaN anywhere fails
        if bad.any():
            i = tuple(int(j) for j in torch.nonzero(bad)[(diff - bound)[bad].argmax()])
            raise AssertionError(
                f"{what}: not close to {name} at {int(bad.sum())} of {bad.numel()} elements; max |diff| "
                f"{diff.max().item():.3e}; worst at {i}: ours {ours[i].item():.7g}, diffusers {lo[i].item():.7g}, "
                f"diffusers with fp64 tables {hi[i].item():.7g}, bound {bound[i].item():.3e}")


def abar(sched, t: int, final: float = 1.0) -> float:
    """alpha-bar_t from the scheduler's own fp32 table; ``final`` before the first timestep."""
    return sched.alphas_cumprod[t].item() if t >= 0 else final


def run_ddpm(dtype, pred, variance_type="fixed_small", clip=None, schedule="linear", num_steps=None,
             our_pred=None):
    scheds = twins(DDPMScheduler, ("alphas_cumprod", "one"), num_steps, beta_schedule=schedule,
                   prediction_type=pred, variance_type=variance_type, clip_sample=clip is not None,
                   clip_sample_range=clip or 1.0)
    if num_steps:  # strided: the previous timestep is the next one of the schedule, then -1
        ts = scheds[0].timesteps.tolist()
        prevs = ts[1:] + [-1]
    else:
        ts = [999, 998, 500, 37, 1, 0]
        prevs = [t - 1 for t in ts]
    g, *g_noise = gens(4)  # inputs; diffusers, its twin and fusediff draw the same noise
    for t, t_prev in zip(ts, prevs):
        x, m = randn(g), randn(g)  # DDPM keeps no state: fresh inputs for every step
        lo, hi = (s.step(m, t, x, generator=gn).prev_sample for s, gn in zip(scheds, g_noise))
        a_t, a_prev = abar(scheds[0], t), abar(scheds[0], t_prev)
        noise = randn(g_noise[2]) if t > 0 else None  # diffusers draws no noise at t = 0
        std = sc.ddpm_noise_std(a_t, a_prev, variance_type) if t > 0 else 0.0
        coeffs = sc.ddpm(a_t, a_prev, prediction_type=our_pred or pred, noise_std=std, clip_sample_range=clip)
        check(step(dtype, x, m, coeffs, noise), lo, hi, f"DDPM t={t} -> {t_prev}")


def run_ddim(dtype, pred, eta=0.0, clip=None, use_clipped=False, alpha_one=True, spacing="leading",
             our_pred=None, num_steps=10):
    scheds = twins(DDIMScheduler, ("alphas_cumprod", "final_alpha_cumprod"), num_steps, prediction_type=pred,
                   clip_sample=clip is not None, clip_sample_range=clip or 1.0, set_alpha_to_one=alpha_one,
                   timestep_spacing=spacing)
    final = 1.0 if alpha_one else abar(scheds[0], 0)
    (g,) = gens(1)
    for t in scheds[0].timesteps.tolist():
        x, m, noise = randn(g), randn(g), randn(g)
        lo, hi = (s.step(m, t, x, eta=eta, use_clipped_model_output=use_clipped,
                         variance_noise=noise).prev_sample for s in scheds)
        # DDIM steps back by num_train // num_inference, whatever the spacing
        t_prev = t - scheds[0].config.num_train_timesteps // num_steps
        coeffs = sc.ddim(abar(scheds[0], t), abar(scheds[0], t_prev, final), eta=eta,
                         prediction_type=our_pred or pred, clip_sample_range=clip,
                         use_clipped_model_output=use_clipped)
        check(step(dtype, x, m, coeffs, noise), lo, hi, f"DDIM t={t} -> {t_prev}")


def run_euler(dtype, pred, churn=0.0, our_pred=None, ancestral=False, num_steps=10):
    """Euler (optionally with churn) or Euler ancestral: three independent chains over a whole run."""
    cls = EulerAncestralDiscreteScheduler if ancestral else EulerDiscreteScheduler
    scheds = twins(cls, ("sigmas",), num_steps, prediction_type=pred)
    sigmas = scheds[0].sigmas.tolist()
    s_tmin, s_tmax, s_noise = 0.5, 5.0, 0.9  # churn only on the middle steps
    g, *g_noise = gens(4)
    xs = [randn(g) * sigmas[0]] * 2
    x_ours = xs[0].to(dtype)
    for i, t in enumerate(scheds[0].timesteps):
        m = randn(g)
        kwargs = {} if ancestral else dict(s_churn=churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
        for s, x in zip(scheds, xs):
            s.scale_model_input(x, t)  # only marks the input as scaled
        xs = [s.step(m, t, x, generator=gn, **kwargs).prev_sample for s, x, gn in zip(scheds, xs, g_noise)]
        if ancestral:
            coeffs = sc.euler_ancestral(sigmas[i], sigmas[i + 1], prediction_type=our_pred or pred)
            noise = randn(g_noise[2])  # drawn at every step, the last included
        else:
            gamma = min(churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
            coeffs = sc.euler(sigmas[i], sigmas[i + 1], prediction_type=our_pred or pred, gamma=gamma,
                              s_noise=s_noise)
            noise = randn(g_noise[2]) if gamma > 0 else None  # diffusers draws only when it churns
        x_ours = step(dtype, x_ours, m, coeffs, noise)
        check(x_ours, *xs, f"{cls.__name__} step {i} sigma {sigmas[i]:.4g} -> {sigmas[i + 1]:.4g}")


def run_dpmpp_2m(dtype, pred, solver_type="midpoint", our_pred=None, num_steps=10):
    scheds = twins(DPMSolverMultistepScheduler, ("sigmas",), num_steps, algorithm_type="dpmsolver++",
                   solver_order=2, solver_type=solver_type, prediction_type=pred, lower_order_final=True)
    sigmas = scheds[0].sigmas.tolist()  # num_steps + 1 values, the last 0
    (g,) = gens(1)
    xs = [randn(g)] * 2
    x_ours, x0_prev = xs[0].to(dtype), None
    for i, t in enumerate(scheds[0].timesteps):
        m = randn(g)
        xs = [s.step(m, t, x).prev_sample for s, x in zip(scheds, xs)]
        # first order at the first step (no history) and the last (to sigma 0); second order between
        s1 = sigmas[i - 1] if 0 < i < num_steps - 1 else None
        coeffs = sc.dpmpp_2m(sigmas[i + 1], sigmas[i], s1, prediction_type=our_pred or pred,
                             solver_type=solver_type)
        history = () if s1 is None else (x0_prev,)  # fusediff's own history: the last step's x0
        x_ours, x0_prev = step(dtype, x_ours, m, coeffs, history=history, return_pred=True)
        check(x_ours, *xs, f"DPM-Solver++ {solver_type} step {i} sigma {sigmas[i]:.4g} -> {sigmas[i + 1]:.4g}")


def run_pndm(dtype, pred, skip_prk=True, alpha_one=False, our_pred=None, num_steps=8):
    scheds = twins(PNDMScheduler, ("alphas_cumprod", "final_alpha_cumprod"), num_steps, prediction_type=pred,
                   skip_prk_steps=skip_prk, set_alpha_to_one=alpha_one)
    ratio = scheds[0].config.num_train_timesteps // num_steps  # 125: odd, PRK half steps are 62 and 63 long
    final = 1.0 if alpha_one else abar(scheds[0], 0)
    n_prk = 0 if skip_prk else 4 * 3  # three RK4 steps of four model calls warm up the history
    (g,) = gens(1)
    xs = [randn(g)] * 2
    x_ours = xs[0].to(dtype)
    ets, group, cur = [], [], None  # PLMS history (oldest first), this RK4 step's outputs, x at its start
    for i, t in enumerate(scheds[0].timesteps.tolist()):
        m = randn(g)
        xs = [s.step(m, t, x).prev_sample for s, x in zip(scheds, xs)]
        if i < n_prk:
            # PRK: all four calls start from x at t0, the RK4 step's start; calls 0, 1 go half a step,
            # 2, 3 the whole step (diffusers' prev timestep: its t, less ratio // 2 on even calls)
            k = i % 4
            if k == 0:
                cur, group = x_ours, []
                ets.append(m)
            group.append(m)
            t_from, t_to, x_from = scheds[0].timesteps[i - k].item(), t - (0 if k % 2 else ratio // 2), cur
            weights, history = ((1 / 6, 1 / 3, 1 / 3, 1 / 6), group[-2::-1]) if k == 3 else ((1.0,), ())
        elif i == 1:  # PLMS only: the second call redoes the first step with the mean of both outputs
            t_from, t_to, x_from = t + ratio, t, cur
            weights, history = (0.5, 0.5), (ets[-1],)
        else:
            t_from, t_to, x_from = t, t - ratio, x_ours
            ets = ets[-3:] + [m]
            if len(ets) == 1:
                cur = x_ours
            weights, history = sc.plms_weights(len(ets)), ets[-2::-1]
        coeffs = sc.pndm(abar(scheds[0], t_from), abar(scheds[0], t_to, final), weights,
                         prediction_type=our_pred or pred)
        x_ours = step(dtype, x_from, m, coeffs, history=history)
        check(x_ours, *xs, f"PNDM call {i} t={t_from} -> {t_to} weights {[round(w, 3) for w in weights]}")


@pytest.mark.parametrize("num_steps", [None, 10], ids=["full", "strided"])
@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("variance_type,clip",
                         [("fixed_small", None), ("fixed_small_log", 1.0), ("fixed_large", 0.7)])
@pytest.mark.parametrize("pred", PREDS)
def test_ddpm(dtype, pred, variance_type, clip, schedule, num_steps):
    run_ddpm(dtype, pred, variance_type, clip, schedule, num_steps)


@pytest.mark.parametrize("alpha_one,spacing", [(True, "leading"), (False, "trailing")])
@pytest.mark.parametrize("clip,use_clipped", [(None, False), (None, True), (1.0, False), (1.0, True)])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("pred", PREDS)
def test_ddim(dtype, pred, eta, clip, use_clipped, alpha_one, spacing):
    run_ddim(dtype, pred, eta, clip, use_clipped, alpha_one, spacing)


@pytest.mark.parametrize("churn", [0.0, 4.0])
@pytest.mark.parametrize("pred", PREDS)
def test_euler(dtype, pred, churn):
    run_euler(dtype, pred, churn)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])  # diffusers raises on "sample"
def test_euler_ancestral(dtype, pred):
    run_euler(dtype, pred, ancestral=True)


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("pred", PREDS)
def test_dpmpp_2m(dtype, pred, solver_type):
    run_dpmpp_2m(dtype, pred, solver_type)


@pytest.mark.parametrize("alpha_one", [True, False])
@pytest.mark.parametrize("skip_prk", [True, False], ids=["plms", "prk"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_pndm(dtype, pred, skip_prk, alpha_one):
    run_pndm(dtype, pred, skip_prk, alpha_one)


RUNNERS = {"ddpm": run_ddpm, "ddim": run_ddim, "euler": run_euler,
           "euler_ancestral": lambda *a, **k: run_euler(*a, ancestral=True, **k),
           "dpmpp_2m": run_dpmpp_2m, "pndm": run_pndm}


@pytest.mark.parametrize("rule", list(RUNNERS))
def test_wrong_prediction_type_is_caught(rule):
    """Coefficients built for v-prediction must fail against an epsilon scheduler: every driver can fail."""
    with use_backend("fused"), pytest.raises(AssertionError, match="not close"):
        RUNNERS[rule](torch.float32, "epsilon", our_pred="v_prediction")
