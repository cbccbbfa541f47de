"""Host cost per call of each fused op against the PyTorch ops it replaces, on small shapes (eager).

A user who runs eagerly pays the host time of every op: argument checks, dispatch, and the launch
itself. This script times it for each op of fusediff.kernels on a CUDA GPU:

  host_us    median over REPS of (wall time of CALLS back-to-back calls, no synchronisation inside) /
             CALLS: the time the host spends issuing one call. CALLS is small enough that the GPU's
             launch queue never fills, so the GPU's own speed does not enter.
  device_us  the call replayed from a CUDA graph (harness.graph_call_ms): GPU time alone.
  vs_torch   host_us / host_us of the "torch" row of the same case: the PyTorch ops a user would
             write instead (the op's ``*_ref`` where that is what they would write). Target <= 1.5.

Implementations per case: ``torch`` (the ops it replaces), ``fusediff`` (the public op, as a model
calls it), ``fusediff, Triton launch`` (the same op with fusediff.kernels._launch's direct launch
turned off: every launch through ``kernel[grid](...)``, the cost before this path existed). The
training cases time forward plus backward of the op on inputs that require gradients.

With --profile each fusediff row also prints the functions where its host time goes (cProfile,
tottime). Rows go to bench/results/launch.csv (or --out DIR).

Usage: python bench/bench_launch.py [--out DIR] [--profile] [--calls N] [--reps N]
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fusediff import kernels as K  # noqa: E402
from fusediff.kernels import scheduler_step_ref, step_coeffs, timestep_embedding_ref  # noqa: E402
from fusediff.kernels import timestep_mlp_ref  # noqa: E402

_launch = importlib.import_module("fusediff.kernels._launch")

CALLS = 100  # calls per timed loop: a few hundred launches, well inside the GPU's launch queue
REPS = 31  # timed loops; the median is kept
WARMUP = 20  # untimed calls first (Triton compiles and autotunes, caches fill)
TARGET = 1.5  # a fused op's host cost at most this many times that of the torch ops it replaces


def host_us(fn: Callable[[], object], calls: int = CALLS, reps: int = REPS) -> float:
    """Median host microseconds per call of ``fn`` issued back to back (see the module docstring)."""
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    times.sort()
    return times[len(times) // 2]


def device_us(fn: Callable[[], object]) -> float:
    try:
        return harness.graph_call_ms(fn) * 1e3
    except RuntimeError as err:  # an op that cannot be captured: say so rather than guess
        print(f"  (no CUDA graph: {str(err).splitlines()[0][:100]})")
        return float("nan")


class triton_launch:
    """Within the block, every Triton launch goes through ``kernel[grid](...)`` (the direct launch is off)."""

    def __enter__(self):
        self.saved, _launch._DIRECT = _launch._DIRECT, False

    def __exit__(self, *exc):
        _launch._DIRECT = self.saved


def _without_direct(fn: Callable[[], object]) -> Callable[[], object]:
    def call():
        with triton_launch():
            return fn()
    return call


def _geglu_torch(x: torch.Tensor) -> torch.Tensor:
    """GEGLU as diffusers writes it: h * gelu(gate) in x's dtype."""
    h, gate = x.chunk(2, dim=-1)
    return h * F.gelu(gate)


def _train(fwd: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def call():
        y = fwd()
        y.backward(torch.ones_like(y))
    return call


def cases(dtype: torch.dtype) -> list[tuple[str, str, dict[str, Callable[[], object]]]]:
    """(op, shape, {impl: call}) for every case; inputs made once."""
    dev = "cuda"
    g = torch.Generator(dev).manual_seed(0)

    def rnd(*shape, dt=dtype, grad=False):
        return torch.randn(*shape, generator=g, device=dev, dtype=dt).requires_grad_(grad)

    out = []
    for shape in ((2, 1280, 8, 8), (2, 320, 64, 64)):  # one-pass plan; split plan (three launches)
        x, w, b = rnd(*shape), rnd(shape[1]), rnd(shape[1])
        out.append(("group_norm_silu", "x".join(map(str, shape)), {
            "torch": lambda x=x, w=w, b=b: F.silu(F.group_norm(x, 32, w, b)),
            "fusediff": lambda x=x, w=w, b=b: K.group_norm(x, 32, w, b, activation="silu"),
        }))
    for sq, sk in ((256, 256), (256, 77)):  # self- and cross-attention, SD's head size 40
        q, k, v = rnd(2, 8, sq, 40), rnd(2, 8, sk, 40), rnd(2, 8, sk, 40)
        out.append(("attention", f"2x8x{sq}x{sk}x40", {
            "torch": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
            "fusediff": lambda q=q, k=k, v=v: K.attention(q, k, v),
        }))
    t = torch.tensor([981, 981], device=dev)
    out.append(("timestep_embedding", "2x320", {
        "torch": lambda: timestep_embedding_ref(t, 320, True, 0.0),
        "fusediff": lambda: K.timestep_embedding(t, 320, True, 0.0),
    }))
    w1, b1, w2, b2 = rnd(1280, 320), rnd(1280), rnd(1280, 1280), rnd(1280)
    out.append(("timestep_mlp", "2x320->1280", {
        "torch": lambda: timestep_mlp_ref(t, 320, True, 0.0, 1.0, 10000, w1, b1, w2, b2),
        "fusediff": lambda: K.timestep_mlp(t, 320, True, 0.0, 1.0, 10000, w1, b1, w2, b2),
    }))
    h = rnd(2, 256, 2 * 1280)
    out.append(("geglu", "2x256x2560", {
        "torch": lambda: _geglu_torch(h),
        "fusediff": lambda: K.geglu(h),
    }))
    xs, m = rnd(2, 4, 64, 64), rnd(2, 4, 64, 64)
    c = step_coeffs("ddim", 0.5, 0.6)
    out.append(("scheduler_step", "2x4x64x64 ddim", {
        "torch": lambda: scheduler_step_ref(xs, m, c),
        "fusediff": lambda: K.scheduler_step(xs, m, c),
    }))
    xg, wg, bg = rnd(2, 320, 64, 64, grad=True), rnd(320, grad=True), rnd(320, grad=True)
    out.append(("group_norm_silu fwd+bwd", "2x320x64x64", {
        "torch": _train(lambda: F.silu(F.group_norm(xg, 32, wg, bg))),
        "fusediff": _train(lambda: K.group_norm(xg, 32, wg, bg, activation="silu")),
    }))
    qg, kg, vg = rnd(2, 8, 256, 40, grad=True), rnd(2, 8, 77, 40, grad=True), rnd(2, 8, 77, 40, grad=True)
    xl, rl = rnd(2, 256, 320), rnd(2, 256, 320)
    wl, bl = rnd(320), rnd(320)
    out.append(("add_layer_norm", "2x256x320", {
        "torch": lambda: (F.layer_norm(xl + rl, (320,), wl, bl), None),
        "fusediff": lambda: K.layer_norm(xl, wl, bl, residual=rl),
    }))
    out.append(("attention fwd+bwd", "2x8x256x77x40", {
        "torch": _train(lambda: F.scaled_dot_product_attention(qg, kg, vg)),
        "fusediff": _train(lambda: K.attention(qg, kg, vg)),
    }))
    for _, _, impls in out:
        if "fusediff" in impls:
            impls["fusediff, Triton launch"] = _without_direct(impls["fusediff"])
    return out


def profile(label: str, fn: Callable[[], object], top: int = 12) -> None:
    """Print where ``fn``'s host time goes (cProfile, by tottime over 500 calls)."""
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(500):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    print(f"--- profile: {label} (500 calls; tottime is per 500) ---")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="directory of the CSV (default bench/results)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--calls", type=int, default=CALLS)
    ap.add_argument("--reps", type=int, default=REPS)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of each fusediff row")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_launch.py needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    rows = []
    for op, shape, impls in cases(dtype):
        base = None
        for impl, fn in impls.items():
            host = host_us(fn, args.calls, args.reps)
            base = host if impl == "torch" else base
            dev = device_us(fn) if "fwd+bwd" not in op else float("nan")
            rows.append(dict(op=op, shape=shape, dtype=args.dtype, impl=impl, host_us=round(host, 2),
                             device_us=round(dev, 2), vs_torch=round(host / base, 2),
                             variants=sum(v.variants() for v in _cached_kernels())))
            print(f"{op:26s} {shape:16s} {impl:24s} host {host:7.2f} us  device {dev:7.2f} us  "
                  f"x{host / base:.2f} of torch", flush=True)
            if args.profile and impl == "fusediff":
                profile(f"{op} {shape}", fn)
    harness.print_table(rows, ["op", "shape", "impl", "host_us", "device_us", "vs_torch"])
    met = [r for r in rows if r["impl"] == "fusediff"]
    print(f"target host <= {TARGET}x torch: met in {sum(r['vs_torch'] <= TARGET for r in met)} of {len(met)} cases")
    print("wrote", harness.append_rows("launch.csv", rows, Path(args.out) if args.out else None))


def _cached_kernels():
    """Every CachedKernel of the kernels' modules imported so far."""
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("fusediff.kernels.") and mod.__name__.endswith("_triton"):
            for value in vars(mod).values():
                if isinstance(value, _launch.CachedKernel):
                    yield value


if __name__ == "__main__":
    main()
