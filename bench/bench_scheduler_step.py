"""Benchmark of the fused scheduler step (fusediff.kernels.scheduler_step) on a CUDA GPU.

For DDIM, Euler and DPM-Solver++ 2M (epsilon prediction) on (2,4,64,64) fp16,
(2,4,128,128) fp16 and (16,3,256,256) fp32 it measures, in one run:
  1. GPU time per update of: the fused kernel; the same update written as PyTorch ops (eager,
     and torch.compile'd into one kernel); fusediff's generic reference; and HF diffusers'
     ``scheduler.step``. ``us_cold``: do_bench median with L2 cleared (by a 256 MB write whose
     dirty lines the timed kernel then evicts). ``us_graph``: back-to-back replays from a CUDA
     graph over input sets rotated through 3x L2 (for what can be captured). Effective GB/s =
     nbytes()/us_graph, and its fraction of the copy bandwidth measured in the same run.
     A sweep of DDIM fp32 sizes sets the step beside a copy_ moving the same bytes.
  2. Host wall time of a 50-step loop of updates (no model): fusediff building each step's
     coefficients and launching the kernel, the same loop captured in a CUDA graph, and
     diffusers' ``scheduler.step`` loop; each ends with a device synchronisation.
Rows go to bench/results/scheduler_step.csv and scheduler_step_loop.csv (or --out DIR).
Usage: python bench/bench_scheduler_step.py [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fusediff import kernels as K  # noqa: E402
from fusediff.kernels import scheduler_step_coeffs as SC  # noqa: E402
from fusediff.kernels import scheduler_step_ref  # noqa: E402

SHAPES = [((2, 4, 64, 64), torch.float16), ((2, 4, 128, 128), torch.float16), ((16, 3, 256, 256), torch.float32)]
RULES = ("ddim", "euler", "dpmpp_2m")
STEPS = 50
MID = STEPS // 2


def make_scheduler(rule: str):
    import diffusers

    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    if rule == "ddim":
        sched = diffusers.DDIMScheduler(**kw, set_alpha_to_one=False, clip_sample=False)
    elif rule == "euler":
        sched = diffusers.EulerDiscreteScheduler(**kw)
    else:
        sched = diffusers.DPMSolverMultistepScheduler(**kw, algorithm_type="dpmsolver++", solver_order=2)
    sched.set_timesteps(STEPS, device="cuda")
    sched.is_scale_input_called = True  # steps are timed without a model; silence Euler's warning
    return sched


def schedule_values(rule: str, sched) -> list[tuple[float, ...]]:
    """Per step, the scalars the coefficient builder takes (from diffusers' schedule)."""
    if rule == "ddim":
        ac = sched.alphas_cumprod.tolist()
        ts = sched.timesteps.tolist()
        gap = sched.config.num_train_timesteps // STEPS
        return [(ac[t], ac[t - gap] if t - gap >= 0 else sched.final_alpha_cumprod.item()) for t in ts]
    sig = sched.sigmas.tolist()
    if rule == "euler":
        return [(sig[i], sig[i + 1]) for i in range(STEPS)]
    return [(sig[i + 1], sig[i], sig[i - 1] if 0 < i < STEPS - 1 else None) for i in range(STEPS)]


def coeffs_of(rule: str, v: tuple) -> SC.StepCoeffs:
    return SC.ddim(*v) if rule == "ddim" else SC.euler(*v) if rule == "euler" else SC.dpmpp_2m(*v)


def torch_update(rule: str, v: tuple):
    """The update written as PyTorch ops in the tensors' dtype (what a hand-written sampler does)."""
    if rule == "ddim":
        a_t, a_prev = v
        a, s = math.sqrt(a_t), math.sqrt(1 - a_t)

        def f(x, m, h):
            x0 = (x - s * m) / a
            return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * m
    elif rule == "euler":
        sigma, sigma_next = v

        def f(x, m, h):
            x0 = x - sigma * m
            d = (x - x0) / sigma
            return x + d * (sigma_next - sigma)
    else:
        s_t, s_0, s_1 = v
        al = lambda s: 1 / math.sqrt(s * s + 1)  # noqa: E731
        lam = lambda s: math.log(al(s)) - math.log(s * al(s))  # noqa: E731
        h_ = lam(s_t) - lam(s_0)
        r0 = (lam(s_0) - lam(s_1)) / h_
        phi = al(s_t) * math.expm1(-h_)

        def f(x, m, h):
            x0 = (x - s_0 * al(s_0) * m) / al(s_0)
            d1 = (x0 - h) / r0
            return (s_t / s_0) * x - phi * x0 - 0.5 * phi * d1, x0
    return f


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: how far fusediff lands from diffusers, relative to the values."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def nbytes(rule: str, t: torch.Tensor) -> int:
    """Fewest bytes one update moves: read x and m (and the history), write out (and x0)."""
    tensors = 5 if rule == "dpmpp_2m" else 3
    return tensors * t.numel() * t.element_size()


def bench_updates(rule, shape, dtype, copy_gbps, quick):
    sched = make_scheduler(rule)
    vals = schedule_values(rule, sched)[MID]
    c = coeffs_of(rule, vals)
    g = torch.Generator(device="cuda").manual_seed(0)
    x, m, h = (torch.randn(shape, generator=g, device="cuda").to(dtype) for _ in range(3))
    hist = [h] if rule == "dpmpp_2m" else []
    f = torch_update(rule, vals)
    compiled = torch.compile(f, dynamic=False)

    def diffusers_step():
        t = sched.timesteps[MID]
        if rule != "ddim":
            sched._step_index = MID
        if rule == "dpmpp_2m":  # the previous x0 is the newest entry before the step shifts it
            sched.model_outputs = [None, h]
            sched.lower_order_nums = 1
        return sched.step(m, t, x).prev_sample

    # Check the fused step against diffusers before timing it.
    fused = K.scheduler_step(x, m, c, history=hist, return_pred=bool(hist))
    fused = fused[0] if hist else fused
    ref_err = rel_diff(fused, diffusers_step())

    def fused_step(x, m, h):
        return K.scheduler_step(x, m, c, history=[h] if hist else [], return_pred=bool(hist))

    def new_inputs():
        return tuple(torch.randn(shape, generator=g, device="cuda").to(dtype) for _ in range(3))

    graphable = {"fused": fused_step, "torch_eager": f, "torch_compile": compiled}
    impls = {
        "fused": lambda: fused_step(x, m, h),
        "torch_eager": lambda: f(x, m, h),
        "torch_compile": lambda: compiled(x, m, h),
        "fusediff_ref": lambda: scheduler_step_ref(x, m, c, history=hist, return_pred=bool(hist)),
        "diffusers_step": diffusers_step,
    }
    if quick:
        impls = {k: impls[k] for k in ("fused", "torch_compile")}
    rows = []
    for name, fn in impls.items():
        cold_ms = harness.do_bench_ms(fn)
        graph_ms = (harness.graph_rotating_ms(graphable[name], new_inputs, nbytes(rule, x))
                    if name in graphable else float("nan"))
        gbps = nbytes(rule, x) / graph_ms / 1e6
        rows.append(dict(op="scheduler_step", rule=rule, shape="x".join(map(str, shape)), dtype=str(dtype)[6:],
                         impl=name, us_cold=round(cold_ms * 1e3, 2), us_graph=round(graph_ms * 1e3, 2),
                         gbps=round(gbps, 1), frac_copy_bw=round(gbps / copy_gbps, 3),
                         mbytes=round(nbytes(rule, x) / 1e6, 2),
                         rel_diff_vs_diffusers=f"{ref_err:.2e}" if name == "fused" else ""))
    return rows


def bench_bandwidth_sweep(copy_gbps):
    """DDIM fp32 at growing sizes, against a copy_ that moves the same bytes, both from graphs."""
    rows = []
    c = SC.ddim(0.3, 0.5)
    for numel in (1 << 22, 1 << 24, 1 << 26):
        def step_inputs():
            return torch.randn(numel, device="cuda"), torch.randn(numel, device="cuda")

        def copy_inputs():  # read 1.5 numel and write 1.5 numel: the step's 3 numel
            return torch.empty(3 * numel // 2, device="cuda").normal_(), torch.empty(3 * numel // 2, device="cuda")

        mb = 3 * numel * 4
        for name, fn, mk in (("fused", lambda x, m: K.scheduler_step(x, m, c), step_inputs),
                             ("copy_same_bytes", lambda a, b: b.copy_(a), copy_inputs)):
            ms = harness.graph_rotating_ms(fn, mk, mb)
            gbps = mb / ms / 1e6
            rows.append(dict(op="scheduler_step_sweep", rule="ddim", shape=str(numel), dtype="float32", impl=name,
                             us_graph=round(ms * 1e3, 2), gbps=round(gbps, 1),
                             frac_copy_bw=round(gbps / copy_gbps, 3), mbytes=round(mb / 1e6, 1)))
    return rows


def bench_loop(rule, shape, dtype, repeat):
    """Host wall ms of a STEPS-step loop; state reset outside the timed region."""
    sched = make_scheduler(rule)
    values = schedule_values(rule, sched)
    g = torch.Generator(device="cuda").manual_seed(1)
    x0, m = (torch.randn(shape, generator=g, device="cuda").to(dtype) for _ in range(2))

    def ours():
        x, prev_pred = x0, None
        for v in values:
            c = coeffs_of(rule, v)
            if rule == "dpmpp_2m":
                hist = [] if v[2] is None else [prev_pred]
                x, prev_pred = K.scheduler_step(x, m, c, history=hist, return_pred=True)
            else:
                x = K.scheduler_step(x, m, c)
        return x

    def theirs():
        x = x0
        for t in sched.timesteps:
            x = sched.step(m, t, x).prev_sample
        return x

    def reset():
        sched.set_timesteps(STEPS, device="cuda")
        sched.is_scale_input_called = True

    # A CUDA graph of the whole loop; coefficients from a device table.
    table = torch.stack([coeffs_of(rule, v).to_tensor("cuda") for v in values])
    state, pred_a, pred_b = x0.clone(), torch.empty_like(x0), torch.empty_like(x0)

    def graph_body():
        preds = (pred_a, pred_b)
        for i, v in enumerate(values):
            if rule == "dpmpp_2m":
                hist = [] if v[2] is None else [preds[(i + 1) % 2]]
                K.scheduler_step(state, m, table[i], history=hist, out=state, pred_out=preds[i % 2])
            else:
                K.scheduler_step(state, m, table[i], out=state)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph_body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_body()

    reset()
    diff = rel_diff(ours(), theirs())
    results = {}
    for name, fn in (("fused_loop", ours), ("fused_cuda_graph", graph.replay), ("diffusers_loop", theirs)):
        times = []
        for _ in range(repeat):
            reset()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        results[name] = sorted(times)[len(times) // 2]
    base = results["diffusers_loop"]
    return [dict(op="scheduler_step_loop", rule=rule, shape="x".join(map(str, shape)), dtype=str(dtype)[6:],
                 steps=STEPS, impl=k, ms=round(v, 3), speedup_vs_diffusers=round(base / v, 1),
                 rel_diff_vs_diffusers=f"{diff:.2e}" if k == "fused_loop" else "")
            for k, v in results.items()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="directory for the CSV files (default bench/results)")
    ap.add_argument("--quick", action="store_true", help="fused and torch.compile only, fewer loop repeats")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_scheduler_step needs a CUDA GPU")
    copy_gbps = harness.copy_bandwidth_gbps()
    print(f"{harness.device_name()}  commit {harness.git_commit()}  copy bandwidth {copy_gbps:.0f} GB/s")
    rows, loops = [], []
    for shape, dtype in SHAPES:
        for rule in RULES:
            rows += bench_updates(rule, shape, dtype, copy_gbps, args.quick)
            loops += bench_loop(rule, shape, dtype, repeat=5 if args.quick else 20)
    rows += bench_bandwidth_sweep(copy_gbps)
    for r in rows:
        r["copy_gbps"] = round(copy_gbps)
    harness.append_rows("scheduler_step.csv", rows, args.out)
    harness.append_rows("scheduler_step_loop.csv", loops, args.out)
    harness.print_table(rows, ["rule", "shape", "dtype", "impl", "mbytes", "us_cold", "us_graph", "gbps",
                               "frac_copy_bw", "rel_diff_vs_diffusers"])
    print()
    harness.print_table(loops, ["rule", "shape", "dtype", "impl", "ms", "speedup_vs_diffusers",
                                "rel_diff_vs_diffusers"])


if __name__ == "__main__":
    main()
