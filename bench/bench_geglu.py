"""Benchmark of GEGLU (fusediff.kernels.geglu) on a CUDA GPU: the gating of SD1.5's feed-forwards.

For the projection outputs x (B, tokens, 2F) of Stable Diffusion 1.5's transformer blocks at 64x64
latents, batch 2 (the shapes of the UNet profile: two elementwise kernels per block in eager mode),
fp16, bf16 and fp32, it times in one run: fusediff's Triton kernel (one launch, x read once);
PyTorch eager as diffusers' GEGLU runs it (``h, gate = x.chunk(2, -1); h * F.gelu(gate)``: a GELU
kernel and a multiply); torch.compile (Inductor) of fusediff's reference (geglu_ref); and, without
--quick, the reference in eager mode. Two times per row: ``us``, the triton.testing.do_bench median
of an eager call with L2 cleared before it, and ``us_graph``, the time per call replayed from a
CUDA graph over inputs that span 3x L2 (device time, cold inputs, no host overhead). Effective
bandwidth, from ``us_graph``, counts x read once and y written once (bytes_moved(): 1.5x x's
bytes), whatever an implementation really moves (eager moves 2x x's bytes: gate read, gelu
written and read back, h read, y written); its fraction of the device's copy bandwidth, measured
in the same run, is the roofline fraction. ``kernels``: distinct CUDA kernels one call runs.
``max_abs_diff``: against float64. ``--profile`` prints each implementation's kernels and
their device times; ``--sweep`` times the kernel's tile shapes instead (geglu_sweep.csv). Rows go
to bench/results/geglu.csv (or --out DIR).

Usage: python bench/bench_geglu.py [--out DIR] [--quick] [--profile] [--sweep]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fusediff import kernels as K  # noqa: E402
from fusediff.kernels import geglu_ref  # noqa: E402

SHAPES = [  # (B, tokens, 2F): SD1.5, 64x64 latents, batch 2; F = 4 * channels
    (2, 4096, 2 * 1280),  # 64x64 tokens, 320 channels (6 blocks per step at this width)
    (2, 1024, 2 * 2560),  # 32x32 tokens, 640 channels (4)
    (2, 256, 2 * 5120),  # 16x16 tokens, 1280 channels (4)
    (2, 64, 2 * 5120),  # 8x8 tokens, the mid block (1)
]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SWEEP = {"block_m": (1, 2, 4, 8, 16, 32), "block_n": (128, 256, 512, 1024), "num_warps": (2, 4, 8)}
COLUMNS = ["op", "shape", "dtype", "approximate", "impl", "kernels", "mbytes", "us", "us_graph", "gbps",
           "frac_copy_bw", "copy_gbps", "speedup_vs_eager_graph", "max_abs_diff"]


def bytes_moved(x: torch.Tensor) -> int:
    """Bytes of x (..., 2F) read once plus y (..., F) written once: the least any implementation must move."""
    return x.numel() * x.element_size() * 3 // 2


def torch_eager(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """diffusers' GEGLU after its projection: a GELU kernel, then a multiply."""
    h, gate = x.chunk(2, dim=-1)
    return h * F.gelu(gate, approximate=approximate)


def implementations(quick: bool) -> dict:
    # one compiled graph per (shape, dtype, approximate): more than dynamo's default 8 recompiles of
    # geglu_ref's code, after which it would run the reference eagerly under the torch.compile label
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    impls = {
        "fusediff": K.geglu,
        "torch eager": torch_eager,
        "torch.compile ref": torch.compile(geglu_ref, dynamic=False),
    }
    if not quick:
        impls["fusediff ref"] = geglu_ref
    return impls


def bench(shape, dtype_name, approximate, impls, copy_gbps, profile=False, device="cuda") -> list[dict]:
    dtype = DTYPES[dtype_name]
    g = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(shape, generator=g, device=device) * 2.5).to(dtype)
    h, gate = x.double().chunk(2, dim=-1)
    want = h * F.gelu(gate, approximate=approximate)
    nbytes = bytes_moved(x)
    rows = []
    for name, fn in impls.items():
        call = lambda x: fn(x, approximate)  # noqa: E731
        with torch.no_grad():
            got = call(x)
            ms = harness.do_bench_ms(lambda: call(x))  # noqa: B023
            graph_ms = harness.graph_rotating_ms(call, lambda: (x.clone(),), nbytes)
            kernels = harness.kernel_times_us(lambda: call(x))  # noqa: B023
        if profile:
            print(f"{'x'.join(map(str, shape))} {dtype_name} {approximate} {name}: "
                  + ", ".join(f"{k[:60]} {v:.1f} us" for k, v in kernels.items()))
        gbps = nbytes / graph_ms / 1e6  # from device time: launch overhead excluded
        rows.append(dict(op="geglu", shape="x".join(map(str, shape)), dtype=dtype_name, approximate=approximate,
                         impl=name, kernels=len(kernels), mbytes=round(nbytes / 2**20, 2), us=round(ms * 1e3, 2),
                         us_graph=round(graph_ms * 1e3, 2), gbps=round(gbps, 1),
                         frac_copy_bw=round(gbps / copy_gbps, 3), copy_gbps=round(copy_gbps),
                         max_abs_diff=f"{(got.double() - want).abs().max().item():.1e}"))
    eager = next((r for r in rows if r["impl"] == "torch eager"), None)
    for r in rows:
        r["speedup_vs_eager_graph"] = round(eager["us_graph"] / r["us_graph"], 2) if eager else ""
    return rows


def sweep(out: Path | None) -> None:
    """Time the kernel over tile shapes (fp16, erf, graph replay) and print the best per shape."""
    import triton

    kernels = sys.modules["fusediff.kernels.geglu"]._kernels()
    rows = []
    for shape in SHAPES:
        x = torch.randn(shape, device="cuda", dtype=torch.float16)
        f = shape[-1] // 2
        default = kernels.config(x.numel() // shape[-1], f)
        configs = [c for c in itertools.product(*SWEEP.values())
                   if 256 <= c[0] * c[1] <= 16384 and c[1] <= max(triton.next_power_of_2(f), 128)]
        configs += [default] if default not in configs else []
        for block_m, block_n, warps in configs:
            options = dict(block_m=block_m, block_n=block_n, num_warps=warps)
            fn = lambda x: kernels.launch(x, "none", **options)  # noqa: B023, E731
            inputs = lambda: (x.clone(),)  # noqa: B023, E731
            with torch.no_grad():
                us = harness.graph_rotating_ms(fn, inputs, bytes_moved(x), min_calls=20, reps=5) * 1e3
            rows.append(dict(shape="x".join(map(str, shape)), block_m=block_m, block_n=block_n, num_warps=warps,
                             default=(block_m, block_n, warps) == default, us_graph=round(us, 2),
                             gbps=round(bytes_moved(x) / us / 1e3, 1)))
    harness.append_rows("geglu_sweep.csv", rows, out)
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = sorted((r for r in rows if r["shape"] == shape), key=lambda r: r["us_graph"])
        default = next(r for r in mine if r["default"])
        print(shape, "default", default, "best:", *mine[:3], sep="\n  ")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="directory for the CSV file (default bench/results)")
    ap.add_argument("--quick", action="store_true", help="fp16, erf form only, without fusediff's reference")
    ap.add_argument("--profile", action="store_true", help="print each implementation's kernels and their times")
    ap.add_argument("--sweep", action="store_true", help="time the kernel's tile shapes instead (geglu_sweep.csv)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_geglu.py needs a CUDA device")
    if args.sweep:
        sweep(args.out)
        return
    copy_gbps = harness.copy_bandwidth_gbps()
    impls = implementations(args.quick)
    rows = []
    for shape in SHAPES:
        for dtype_name in (["fp16"] if args.quick else list(DTYPES)):
            for approximate in (["none"] if args.quick else ["none", "tanh"]):
                rows += bench(shape, dtype_name, approximate, impls, copy_gbps, args.profile)
    path = harness.append_rows("geglu.csv", [{c: r.get(c, "") for c in COLUMNS} for r in rows], args.out)
    harness.print_table(rows, COLUMNS)
    print(f"copy bandwidth {copy_gbps:.0f} GB/s (read + write); us: do_bench with L2 cleared; us_graph: CUDA-graph "
          f"replay over inputs spanning 3x L2; gbps from us_graph; rows appended to {path}")


if __name__ == "__main__":
    main()
