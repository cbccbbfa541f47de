"""Benchmark of GroupNorm+SiLU training (forward + backward, fusediff.kernels.group_norm) on a CUDA GPU.

At the feature maps of diffusion UNets in training (batch 16-128), bf16 and fp16 (fp32 with
--dtypes), NCHW and NHWC, it times in one run: fusediff's Triton forward and backward; PyTorch
eager (F.group_norm then F.silu, autograd); the same under torch.compile (Inductor, forward and
backward graphs); and fusediff's reference (group_norm_ref, autograd through torch ops) unless
--quick. Two times per row, each the triton.testing.do_bench median with L2 cleared before every
call: ``us_fwd_bwd``, a forward and torch.autograd.grad for x, weight and bias; and ``us_bwd``,
the backward alone (autograd.grad on a retained graph). Effective bandwidth counts the least a
training step of the op must move, ``bytes_moved()``: x read and y written by the forward, dy and
x read and dx written by the backward (five times x's size; statistics and parameters are
negligible); its fraction of the device's copy bandwidth, measured in the same run, is the
roofline fraction. ``max_rel_diff_fp64`` is dx's largest difference from a float64 autograd
reference, relative to dx's largest magnitude. Rows go to bench/results/group_norm_backward.csv
(or --out DIR).

Usage: python bench/bench_group_norm_backward.py [--out DIR] [--quick] [--dtypes bf16,fp16,fp32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch._functorch.config  # noqa: F401  (donated_buffer, set in main)
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fusediff import kernels as K  # noqa: E402
from fusediff.kernels import group_norm_ref  # noqa: E402

GROUPS = 32
SHAPES = [(128, 128, 32, 32), (16, 320, 64, 64), (16, 640, 32, 32), (16, 1280, 16, 16), (8, 512, 64, 64),
          (4, 256, 128, 128)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bytes_moved(x: torch.Tensor) -> int:
    """Bytes of one training step of the op at least: forward x read + y written, backward dy and x
    read + dx written."""
    return 5 * x.numel() * x.element_size()


def torch_eager(x, w, b):
    return F.silu(F.group_norm(x, GROUPS, w, b, 1e-5))


def implementations(quick: bool) -> dict:
    impls = {
        "fusediff": lambda x, w, b: K.group_norm(x, GROUPS, w, b, 1e-5, "silu"),
        "torch.compile": torch.compile(torch_eager, dynamic=False),
        "torch eager": torch_eager,
    }
    if not quick:
        impls["fusediff ref"] = lambda x, w, b: group_norm_ref(x, GROUPS, w, b, 1e-5, "silu")
    return impls


def fwd_bwd(fn, x, w, b, dy):
    """One training step of the op: the forward, then the gradients of x, weight and bias."""
    return torch.autograd.grad(fn(x, w, b), (x, w, b), dy)


def max_rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def bench(shape, dtype_name, layout, impls, copy_gbps) -> list[dict]:
    dtype = DTYPES[dtype_name]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, generator=g, device="cuda").to(dtype)
    dy = torch.randn(shape, generator=g, device="cuda").to(dtype)
    if layout == "nhwc":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    w = (1 + 0.5 * torch.randn(shape[1], generator=g, device="cuda")).to(dtype)
    b = (0.5 * torch.randn(shape[1], generator=g, device="cuda")).to(dtype)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    want = fwd_bwd(lambda x, w, b: group_norm_ref(x, GROUPS, w, b, 1e-5, "silu"), x64, w64, b64, dy.double())[0]
    del x64, w64, b64
    rows = []
    with K.use_backend("auto"):
        for name, fn in impls.items():
            got = fwd_bwd(fn, x, w, b, dy)[0]
            ms = harness.do_bench_ms(lambda: fwd_bwd(fn, x, w, b, dy))  # noqa: B023
            y = fn(x, w, b)
            bwd_ms = harness.do_bench_ms(lambda: torch.autograd.grad(y, (x, w, b), dy, retain_graph=True))  # noqa: B023
            gbps = bytes_moved(x) / ms / 1e6
            rows.append(dict(op="group_norm_silu_fwd_bwd", shape="x".join(map(str, shape)), groups=GROUPS,
                             dtype=dtype_name, layout=layout, impl=name,
                             mbytes=round(x.numel() * x.element_size() / 2**20, 2), us_fwd_bwd=round(ms * 1e3, 2),
                             us_bwd=round(bwd_ms * 1e3, 2), gbps=round(gbps, 1),
                             frac_copy_bw=round(gbps / copy_gbps, 3), copy_gbps=round(copy_gbps),
                             max_rel_diff_fp64=f"{max_rel_diff(got, want):.1e}"))
    compiled = {r["impl"]: r for r in rows}.get("torch.compile")
    for r in rows:
        r["speedup_vs_compile"] = round(compiled["us_fwd_bwd"] / r["us_fwd_bwd"], 2) if compiled else ""
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="directory for the CSV file (default bench/results)")
    ap.add_argument("--quick", action="store_true", help="bf16 only, two shapes, without fusediff's reference")
    ap.add_argument("--dtypes", default="bf16,fp16", help="comma-separated from bf16, fp16, fp32 (default bf16,fp16)")
    args = ap.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or not dtypes:
        ap.error(f"--dtypes: unknown {unknown or 'empty list'}; choose from {', '.join(DTYPES)}")
    if not torch.cuda.is_available():
        sys.exit("bench_group_norm_backward.py needs a CUDA device")
    torch._dynamo.config.recompile_limit = 1024  # one compiled graph per shape, dtype and layout
    torch._dynamo.config.cache_size_limit = 1024
    # the backward-only timing runs one compiled backward again and again on a retained graph
    torch._functorch.config.donated_buffer = False
    copy_gbps = harness.copy_bandwidth_gbps()
    impls = implementations(args.quick)
    shapes = SHAPES[:2] if args.quick else SHAPES
    rows = []
    for shape in shapes:
        for dtype_name in (["bf16"] if args.quick else dtypes):
            for layout in ("nchw", "nhwc"):
                rows += bench(shape, dtype_name, layout, impls, copy_gbps)
    path = harness.append_rows("group_norm_backward.csv", rows, args.out)
    harness.print_table(rows, ["shape", "dtype", "layout", "impl", "mbytes", "us_fwd_bwd", "us_bwd", "gbps",
                               "frac_copy_bw", "speedup_vs_compile", "max_rel_diff_fp64"])
    print(f"copy bandwidth {copy_gbps:.0f} GB/s; rows appended to {path}")


if __name__ == "__main__":
    main()
