"""Benchmark of attention without a mask (fusediff.kernels.attention) on a CUDA GPU.

For Stable Diffusion's attention shapes (self- and cross-attention, heads of 40 to 128), in
fp16 (and bf16 unless --quick), it times in one run: fusediff's Triton flash-attention kernel
(autotuned on its first call, which is not timed); torch's scaled_dot_product_attention with each
of the FLASH_ATTENTION, EFFICIENT_ATTENTION and CUDNN_ATTENTION backends (a backend that refuses
a shape is skipped with a note); and torch.compile of fusediff's reference (attention_ref, the
definition), where its float32 (B, H, Sq, Sk) scores fit in MAX_SCORE_GB. Times are
triton.testing.do_bench medians with L2 cleared before each call (an eager call: where the host's
launch path takes longer than the L2 flush, it shows), and ms_graph, the time per call replayed
from a CUDA graph over L2-rotated inputs (device time only). flops() counts the two
products, 4 * B * H * Sq * Sk * D; the fraction of the device's bf16 matmul rate, measured in the
same run (fp16's dense rate is the same on A100/H100), is the roofline fraction; vs_flash and
vs_cudnn divide a row's TFLOP/s by those of the flash and cuDNN rows. max_err is the largest
absolute difference from the reference computed in float32 (fp32 softmax, one rounding).
Rows go to bench/results/attention.csv (or --out DIR).

Usage: python bench/bench_attention.py [--out DIR] [--quick] [--no-compile]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fusediff import kernels as K  # noqa: E402
from fusediff.kernels import attention_ref  # noqa: E402

SHAPES = [  # (B, H, Sq, Sk, D)
    (2, 8, 4096, 4096, 40),  # SD 1.5, 64x64 latents, self-attention
    (2, 8, 4096, 77, 40),  # the same, cross-attention to 77 text tokens
    (2, 8, 1024, 1024, 80),  # SD 1.5, 32x32
    (2, 10, 4096, 4096, 64),  # heads of 64
    (1, 24, 4096, 4096, 128),  # DiT-like heads of 128
]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SDPA_BACKENDS = {"sdpa flash": SDPBackend.FLASH_ATTENTION, "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "sdpa cudnn": SDPBackend.CUDNN_ATTENTION}
MAX_SCORE_GB = 4.0  # torch.compile of the reference materialises float32 scores: skip above this
REF_CHUNK_BYTES = 1 << 30  # the float32 reference runs over chunks of query rows of this many score bytes


def flops(b: int, h: int, sq: int, sk: int, d: int) -> int:
    """Multiply-adds of q k^T and p v, two flops each: 4 * B * H * Sq * Sk * D."""
    return 4 * b * h * sq * sk * d


def score_gb(b: int, h: int, sq: int, sk: int) -> float:
    return b * h * sq * sk * 4 / 1e9


def reference(q, k, v) -> torch.Tensor:
    """attention_ref on float32 copies, over chunks of query rows: float32 (B, H, Sq, D)."""
    b, h, sq, _ = q.shape
    rows = max(1, REF_CHUNK_BYTES // (b * h * k.shape[2] * 4 * 3))
    q, k, v = q.float(), k.float(), v.float()
    return torch.cat([attention_ref(q[:, :, i:i + rows], k, v) for i in range(0, sq, rows)], dim=2)


def inputs(shape, dtype):
    """q, k, v as (B, H, S, D) views of (B, S, H, D) projections, as a model's Linear layers write them."""
    b, h, sq, sk, d = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda s: torch.randn(b, s, h, d, generator=g, device="cuda").to(dtype).transpose(1, 2)  # noqa: E731
    return make(sq), make(sk), make(sk)


def tuned_config() -> str:
    """The config the autotuner chose for fusediff's last call: BLOCK_MxBLOCK_N, warps, stages."""
    c = sys.modules["fusediff.kernels.attention"]._kernels()._tuned_kernel.best_config
    ws = " ws" if c.kwargs.get("WARP_SPECIALIZE") else ""
    return f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}{ws}"


def implementations(shape, use_compile: bool) -> dict:
    impls = {"fusediff": lambda q, k, v: K.attention(q, k, v)}
    for name, backend in SDPA_BACKENDS.items():
        impls[name] = (backend, lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    gb = score_gb(*shape[:4])
    if use_compile and gb > MAX_SCORE_GB:
        print(f"note: {shape}: torch.compile(attention_ref) skipped, its scores take {gb:.1f} GB")
    elif use_compile:
        torch.compiler.reset()  # one compiled graph per shape and dtype; ten would pass dynamo's recompile limit
        impls["torch.compile(attention_ref)"] = torch.compile(attention_ref, dynamic=False)
    return impls


def bench(shape, dtype_name, use_compile, matmul_rate) -> list[dict]:
    dtype = DTYPES[dtype_name]
    q, k, v = inputs(shape, dtype)
    want = reference(q, k, v)
    rows = []
    for name, impl in implementations(shape, use_compile).items():
        backend, fn = impl if isinstance(impl, tuple) else (None, impl)
        with torch.no_grad(), sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            try:
                got = fn(q, k, v)  # fusediff autotunes here, outside the timing
            except RuntimeError as err:
                print(f"note: {shape} {dtype_name}: {name} unavailable ({str(err).splitlines()[0][:120]})")
                continue
            torch.cuda.synchronize()
            ms = harness.do_bench_ms(lambda: fn(q, k, v))
            nbytes = sum(t.numel() * t.element_size() for t in (q, k, v, got))
            graph_ms = harness.graph_rotating_ms(fn, lambda: tuple(t.clone() for t in (q, k, v)), nbytes,
                                                 min_calls=20, reps=5)
        tflops = flops(*shape) / ms / 1e9
        rows.append(dict(op="attention", shape="x".join(map(str, shape)), dtype=dtype_name, impl=name,
                         ms=round(ms, 4), ms_graph=round(graph_ms, 4),
                         tflops_graph=round(flops(*shape) / graph_ms / 1e9, 1), tflops=round(tflops, 1), frac_matmul=round(tflops / matmul_rate, 3),
                         matmul_tflops=round(matmul_rate), max_err=f"{(got.float() - want).abs().max().item():.1e}",
                         config=tuned_config() if name == "fusediff" else ""))
    by_impl = {r["impl"]: r["tflops"] for r in rows}
    for r in rows:
        for col, other in (("vs_flash", "sdpa flash"), ("vs_cudnn", "sdpa cudnn")):
            r[col] = round(r["tflops"] / by_impl[other], 2) if by_impl.get(other) else ""
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="directory for the CSV file (default bench/results)")
    ap.add_argument("--quick", action="store_true", help="fp16 only")
    ap.add_argument("--no-compile", action="store_true", help="without the torch.compile(attention_ref) rows")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA device")
    start = time.perf_counter()
    matmul_rate = harness.matmul_tflops()
    dtypes = ["fp16"] if args.quick else list(DTYPES)
    rows = []
    for shape in SHAPES:
        for dtype_name in dtypes:
            t0 = time.perf_counter()
            rows += bench(shape, dtype_name, not args.no_compile, matmul_rate)
            print(f"{shape} {dtype_name}: {time.perf_counter() - t0:.1f} s (tuning and compiling included)", flush=True)
    path = harness.append_rows("attention.csv", rows, args.out)
    harness.print_table(rows, ["shape", "dtype", "impl", "ms", "ms_graph", "tflops", "tflops_graph", "frac_matmul", "vs_flash", "vs_cudnn",
                               "max_err", "config"])
    print(f"bf16 matmul {matmul_rate:.0f} TFLOP/s; {time.perf_counter() - start:.0f} s in all; rows appended to {path}")


if __name__ == "__main__":
    main()
