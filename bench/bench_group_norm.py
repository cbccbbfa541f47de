"""Benchmark of GroupNorm+SiLU (fusediff.kernels.group_norm) on a CUDA GPU.

For the feature maps of diffusion UNets and VAEs (SD 1.5 UNet and VAE shapes), fp16, bf16 and fp32,
NCHW and NHWC, it times in one run: fusediff's Triton kernels; PyTorch eager
(F.group_norm then F.silu); the same two ops under torch.compile (Inductor); and fusediff's
reference (group_norm_ref). Two times per row: ``us``, the triton.testing.do_bench median of
an eager call with L2 cleared before it (host launch overhead shows where it exceeds the L2
flush), and ``us_graph``, the time per call replayed from a CUDA graph over inputs that span
3x L2 (device time, cold inputs, no host overhead). Effective bandwidth, from ``us_graph``,
counts x read once and y written once (bytes_moved()), whatever an implementation really
moves; its fraction of the device's copy bandwidth, measured in the same run, is the roofline
fraction. ``--profile`` prints each implementation's kernels and their device times. Rows go to bench/results/group_norm.csv (or --out DIR).

Usage: python bench/bench_group_norm.py [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fusediff import kernels as K  # noqa: E402
from fusediff.kernels import group_norm_ref  # noqa: E402
from fusediff.kernels import group_norm_triton as GT  # noqa: E402

GROUPS = 32
SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (1, 512, 128, 128), (1, 256, 256, 256),
          (1, 128, 512, 512)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def bytes_moved(x: torch.Tensor) -> int:
    """Bytes of x read once plus y written once: the least any implementation must move."""
    return 2 * x.numel() * x.element_size()


def torch_eager(x, w, b):
    return F.silu(F.group_norm(x, GROUPS, w, b, 1e-5))


def implementations(quick: bool) -> dict:
    impls = {
        "fusediff": lambda x, w, b: K.group_norm(x, GROUPS, w, b, 1e-5, "silu"),
        "torch.compile": torch.compile(torch_eager, dynamic=False),
    }
    impls["torch eager"] = torch_eager
    if not quick:
        impls["fusediff ref"] = lambda x, w, b: group_norm_ref(x, GROUPS, w, b, 1e-5, "silu")
    return impls


def launch_plan(x, w, b, channels_last, plan):
    """fusediff's Triton kernels with the plan forced."""
    return GT.launch(x, GROUPS, w, b, 1e-5, True, channels_last, force_plan=plan)


def max_rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


def bench(shape, dtype_name, layout, impls, copy_gbps, profile=False) -> list[dict]:
    dtype = DTYPES[dtype_name]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, generator=g, device="cuda").to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(shape[1], generator=g, device="cuda").to(dtype)
    b = torch.randn(shape[1], generator=g, device="cuda").to(dtype)
    want = torch_eager(x.double(), w.double(), b.double())
    impls = dict(impls)
    for plan in ("one_pass", "split"):  # every plan the group fits, to check the choice
        if plan != GT.plan(x, GROUPS) and (plan != "one_pass" or GT.fits_one_pass(x, GROUPS)):
            impls[f"fusediff {plan}"] = functools.partial(launch_plan, channels_last=layout == "nhwc", plan=plan)
    rows = []
    for name, fn in impls.items():
        with torch.no_grad():
            got = fn(x, w, b)
            ms = harness.do_bench_ms(lambda: fn(x, w, b))
            graph_ms = harness.graph_rotating_ms(fn, lambda: (x.clone(), w, b), bytes_moved(x))
            if profile:
                kernels = harness.kernel_times_us(lambda: fn(x, w, b))
                print(f"{'x'.join(map(str, shape))} {dtype_name} {layout} {name}: "
                      + ", ".join(f"{k[:60]} {v:.1f} us" for k, v in kernels.items()))
        gbps = bytes_moved(x) / graph_ms / 1e6  # from device time: launch overhead excluded
        rows.append(dict(op="group_norm_silu", shape="x".join(map(str, shape)), groups=GROUPS, dtype=dtype_name,
                         layout=layout, impl=name, mbytes=round(x.numel() * x.element_size() / 2**20, 2),
                         us=round(ms * 1e3, 2), us_graph=round(graph_ms * 1e3, 2), gbps=round(gbps, 1), frac_copy_bw=round(gbps / copy_gbps, 3),
                         copy_gbps=round(copy_gbps), max_rel_diff_fp64=f"{max_rel_diff(got, want):.1e}"))
    by_impl = {r["impl"]: r for r in rows}
    compiled = by_impl.get("torch.compile")
    for r in rows:
        r["speedup_vs_compile"] = round(compiled["us"] / r["us"], 2) if compiled else ""
        r["speedup_vs_compile_graph"] = round(compiled["us_graph"] / r["us_graph"], 2) if compiled else ""
    return rows


SWEEP_SHAPES = [(1, 128, 512, 512), (1, 512, 128, 128), (2, 320, 64, 64), (2, 1280, 16, 16)]
SWEEP = {"TILE": (2048, 4096, 8192), "TILE_WARPS": (4, 8), "PROGRAMS_PER_SM": (4, 16), "MAX_TILE_C": (64, 128)}


def sweep(out: Path | None) -> None:
    """Time the split plan (and the one pass where it fits) over the tuning constants, fp16, graph replay."""
    import itertools

    rows = []
    defaults = {k: getattr(GT, k) for k in (*SWEEP, "ONE_PASS_ELEMS_PER_WARP", "MAX_TILE_C")}
    for shape, layout in itertools.product(SWEEP_SHAPES, ("nchw", "nhwc")):
        x = torch.randn(shape, device="cuda", dtype=torch.float16)
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(shape[1], device="cuda").half(), torch.randn(shape[1], device="cuda").half()
        configs = [dict(zip(SWEEP, v), plan="split") for v in itertools.product(*SWEEP.values())]
        if GT.fits_one_pass(x, GROUPS):
            configs += [dict(ONE_PASS_ELEMS_PER_WARP=e, plan="one_pass") for e in (256, 512, 1024, 2048)]
        for cfg in configs:
            for k, v in cfg.items():
                if k != "plan":
                    setattr(GT, k, v)
            fn = functools.partial(launch_plan, channels_last=layout == "nhwc", plan=cfg["plan"])
            with torch.no_grad():
                us = harness.graph_rotating_ms(fn, lambda: (x.clone(), w, b), bytes_moved(x),  # noqa: B023
                                               min_calls=20, reps=5) * 1e3
            rows.append(dict(shape="x".join(map(str, shape)), layout=layout, plan=cfg["plan"],
                             **{k: getattr(GT, k) for k in defaults}, us_graph=round(us, 2),
                             gbps=round(bytes_moved(x) / us / 1e3, 1)))
            for k, v in defaults.items():
                setattr(GT, k, v)
    harness.append_rows("group_norm_sweep.csv", rows, out)
    for key in dict.fromkeys((r["shape"], r["layout"]) for r in rows):
        mine = sorted((r for r in rows if (r["shape"], r["layout"]) == key), key=lambda r: r["us_graph"])
        short = lambda r: {k: v for k, v in r.items() if k not in ("shape", "layout")}  # noqa: E731
        print(*key, "best:", *map(short, mine[:3]), sep="\n  ")
        print("  per plan:", {p: min(r["us_graph"] for r in mine if r["plan"] == p) for p in dict.fromkeys(r["plan"] for r in mine)})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="directory for the CSV file (default bench/results)")
    ap.add_argument("--sweep", action="store_true", help="time the tuning constants instead (group_norm_sweep.csv)")
    ap.add_argument("--profile", action="store_true", help="print each implementation's kernels and their times")
    ap.add_argument("--quick", action="store_true", help="fp16 only, without fusediff's reference")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_group_norm.py needs a CUDA device")
    torch._dynamo.config.recompile_limit = 1024  # one compiled graph per shape, dtype and layout
    torch._dynamo.config.cache_size_limit = 1024
    if args.sweep:
        return sweep(args.out)
    copy_gbps = harness.copy_bandwidth_gbps()
    impls = implementations(args.quick)
    dtypes = ["fp16"] if args.quick else list(DTYPES)
    rows = []
    for shape in SHAPES:
        for dtype_name in dtypes:
            for layout in ("nchw", "nhwc"):
                rows += bench(shape, dtype_name, layout, impls, copy_gbps, args.profile)
    path = harness.append_rows("group_norm.csv", rows, args.out)
    harness.print_table(rows, ["shape", "dtype", "layout", "impl", "mbytes", "us", "us_graph", "gbps", "frac_copy_bw",
                               "speedup_vs_compile", "speedup_vs_compile_graph", "max_rel_diff_fp64"])
    print(f"copy bandwidth {copy_gbps:.0f} GB/s; rows appended to {path}")


if __name__ == "__main__":
    main()
