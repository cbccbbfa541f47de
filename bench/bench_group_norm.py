"""Benchmark of GroupNorm+SiLU (fusediff.kernels.group_norm) on a CUDA GPU.

For the feature maps of diffusion UNets and VAEs (the shapes of issue 4), fp16, bf16 and fp32,
NCHW and NHWC, it times in one run: fusediff's Triton kernels; PyTorch eager
(F.group_norm then F.silu); the same two ops under torch.compile (Inductor); and fusediff's
reference (group_norm_ref). Times are triton.testing.do_bench medians with L2 cleared before
each call. Effective bandwidth counts x read once and y written once (bytes()), whatever an
implementation really moves; its fraction of the device's copy bandwidth, measured in the same
run, is the roofline fraction. Rows go to bench/results/group_norm.csv (or --out DIR).

Usage: python bench/bench_group_norm.py [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fusediff import kernels as K  # noqa: E402
from fusediff.kernels import group_norm_ref  # noqa: E402

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
    if not quick:
        impls["torch eager"] = torch_eager
        impls["fusediff ref"] = lambda x, w, b: group_norm_ref(x, GROUPS, w, b, 1e-5, "silu")
    return impls


def max_rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


def bench(shape, dtype_name, layout, impls, copy_gbps) -> list[dict]:
    dtype = DTYPES[dtype_name]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, generator=g, device="cuda").to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(shape[1], generator=g, device="cuda").to(dtype)
    b = torch.randn(shape[1], generator=g, device="cuda").to(dtype)
    want = torch_eager(x.double(), w.double(), b.double())
    rows = []
    for name, fn in impls.items():
        with torch.no_grad():
            got = fn(x, w, b)
            ms = harness.do_bench_ms(lambda: fn(x, w, b))
        gbps = bytes_moved(x) / ms / 1e6
        rows.append(dict(op="group_norm_silu", shape="x".join(map(str, shape)), groups=GROUPS, dtype=dtype_name,
                         layout=layout, impl=name, mbytes=round(x.numel() * x.element_size() / 2**20, 2),
                         us=round(ms * 1e3, 2), gbps=round(gbps, 1), frac_copy_bw=round(gbps / copy_gbps, 3),
                         copy_gbps=round(copy_gbps), max_rel_diff_fp64=f"{max_rel_diff(got, want):.1e}"))
    compiled = {r["impl"]: r["us"] for r in rows}.get("torch.compile")
    for r in rows:
        r["speedup_vs_compile"] = round(compiled / r["us"], 2) if compiled else ""
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="directory for the CSV file (default bench/results)")
    ap.add_argument("--quick", action="store_true", help="fusediff and torch.compile only, fp16 only")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_group_norm.py needs a CUDA device")
    copy_gbps = harness.copy_bandwidth_gbps()
    impls = implementations(args.quick)
    dtypes = ["fp16"] if args.quick else list(DTYPES)
    rows = []
    for shape in SHAPES:
        for dtype_name in dtypes:
            for layout in ("nchw", "nhwc"):
                rows += bench(shape, dtype_name, layout, impls, copy_gbps)
    path = harness.append_rows("group_norm.csv", rows, args.out)
    harness.print_table(rows, ["shape", "dtype", "layout", "impl", "mbytes", "us", "gbps", "frac_copy_bw",
                               "speedup_vs_compile", "max_rel_diff_fp64"])
    print(f"copy bandwidth {copy_gbps:.0f} GB/s; rows appended to {path}")


if __name__ == "__main__":
    main()
