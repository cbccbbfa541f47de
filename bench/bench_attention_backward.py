"""Benchmark of attention's forward + backward (a training step's attention) on a CUDA GPU.

For DDPM-CIFAR and Stable Diffusion shapes, in fp16 and bf16 (fp16 only with --quick), it times
out = attention(q, k, v); out.backward(dout) for: fusediff (the Triton forward with its log-sum-exp,
then the Triton backward of attention_backward_triton.py; tuned on the first call, not timed); torch's
scaled_dot_product_attention with each of the FLASH_ATTENTION, EFFICIENT_ATTENTION and CUDNN_ATTENTION
backends (a backend that refuses a shape is skipped with a note); and torch.compile of fusediff's
reference (attention_ref) where its float32 scores fit in MAX_SCORE_GB. Times are
triton.testing.do_bench medians (harness.do_bench_ms); the gradients of q, k and v are reset between
calls. FLOPs: the forward's two products are 4 * B * H * Sq * Sk * D; the backward's five (q k^T
recomputed, dO v^T, dV = P^T dO, dQ = dS k, dK = dS^T q) are 2.5x that, so one step counts
3.5 * 4 * B * H * Sq * Sk * D (FlashAttention-2's convention, arXiv:2307.08691, Sec. 4.1). frac_matmul
is the fraction of the device's bf16 matmul rate measured in the same run. max_err is the largest
|dq| error against the float32 reference's autograd. Rows go to bench/results/attention_backward.csv
(or --out DIR).

Usage: python bench/bench_attention_backward.py [--out DIR] [--quick] [--no-compile]
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
    (128, 1, 256, 256, 128),  # DDPM CIFAR-10 UNet, 16x16 attention, one head of 128, batch 128
    (128, 1, 64, 64, 256),  # DDPM CIFAR-10, 8x8, one head of 256
    (2, 8, 4096, 4096, 40),  # SD 1.5, 64x64 latents, self-attention
    (2, 8, 4096, 77, 40),  # the same, cross-attention to 77 text tokens
    (2, 8, 1024, 1024, 80),  # SD 1.5, 32x32
    (2, 8, 256, 256, 160),  # SD 1.5, 16x16
    (2, 10, 4096, 4096, 64),  # heads of 64
]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SDPA_BACKENDS = {"sdpa flash": SDPBackend.FLASH_ATTENTION, "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "sdpa cudnn": SDPBackend.CUDNN_ATTENTION}
MAX_SCORE_GB = 4.0  # torch.compile of the reference keeps float32 scores and probabilities: skip above this
BACKWARD_FLOPS_FACTOR = 2.5  # the backward's products are 2.5x the forward's (5 matmuls against 2)


def flops(b: int, h: int, sq: int, sk: int, d: int) -> int:
    """Forward plus backward: (1 + 2.5) * 4 * B * H * Sq * Sk * D."""
    return int((1 + BACKWARD_FLOPS_FACTOR) * 4 * b * h * sq * sk * d)


def score_gb(b: int, h: int, sq: int, sk: int) -> float:
    return b * h * sq * sk * 4 / 1e9


def inputs(shape, dtype):
    """q, k, v as (B, H, S, D) views of (B, S, H, D) projections, requiring grad, and dout."""
    b, h, sq, sk, d = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda s: torch.randn(b, s, h, d, generator=g, device="cuda").to(dtype).transpose(1, 2)  # noqa: E731
    q, k, v = (t.requires_grad_() for t in (make(sq), make(sk), make(sk)))
    return q, k, v, torch.randn(b, h, sq, d, generator=g, device="cuda").to(dtype)


def implementations(shape, use_compile: bool) -> dict:
    """name -> (SDPA backend or None, fn(q, k, v) -> out)."""
    impls = {"fusediff": (None, lambda q, k, v: K.attention(q, k, v))}
    for name, backend in SDPA_BACKENDS.items():
        impls[name] = (backend, lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    gb = score_gb(*shape[:4])
    if use_compile and gb > MAX_SCORE_GB:
        print(f"note: {shape}: torch.compile(attention_ref) skipped, its scores take {gb:.1f} GB")
    elif use_compile:
        torch.compiler.reset()
        impls["torch.compile(attention_ref)"] = (None, torch.compile(attention_ref, dynamic=False))
    return impls


def step(fn, q, k, v, dout):
    """One forward and backward; returns dq."""
    for t in (q, k, v):
        t.grad = None
    fn(q, k, v).backward(dout)
    return q.grad


def reference_dq(q, k, v, dout) -> torch.Tensor:
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    attention_ref(qf, kf, vf).backward(dout.float())
    return qf.grad


def bench(shape, dtype_name, use_compile, matmul_rate) -> list[dict]:
    q, k, v, dout = inputs(shape, DTYPES[dtype_name])
    want = reference_dq(q, k, v, dout) if score_gb(*shape[:4]) <= MAX_SCORE_GB else None
    rows = []
    for name, (backend, fn) in implementations(shape, use_compile).items():
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            try:
                dq = step(fn, q, k, v, dout).clone()  # tuning and compiling happen here, untimed
            except RuntimeError as err:
                print(f"note: {shape} {dtype_name}: {name} unavailable ({str(err).splitlines()[0][:120]})")
                continue
            torch.cuda.synchronize()
            ms = harness.do_bench_ms(lambda: step(fn, q, k, v, dout))
        tflops = flops(*shape) / ms / 1e9
        err = f"{(dq.float() - want).abs().max().item():.1e}" if want is not None else ""
        rows.append(dict(op="attention_fwd_bwd", shape="x".join(map(str, shape)), dtype=dtype_name, impl=name,
                         ms=round(ms, 4), tflops=round(tflops, 1), frac_matmul=round(tflops / matmul_rate, 3),
                         matmul_tflops=round(matmul_rate), max_err=err))
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
        sys.exit("bench_attention_backward.py needs a CUDA device")
    start = time.perf_counter()
    matmul_rate = harness.matmul_tflops()
    rows = []
    for shape in SHAPES:
        for dtype_name in (["fp16"] if args.quick else list(DTYPES)):
            t0 = time.perf_counter()
            rows += bench(shape, dtype_name, not args.no_compile, matmul_rate)
            print(f"{shape} {dtype_name}: {time.perf_counter() - t0:.1f} s (tuning and compiling included)", flush=True)
    path = harness.append_rows("attention_backward.csv", rows, args.out)
    harness.print_table(rows, ["shape", "dtype", "impl", "ms", "tflops", "frac_matmul", "vs_flash", "vs_cudnn",
                               "max_err"])
    print(f"bf16 matmul {matmul_rate:.0f} TFLOP/s; backward counted as {BACKWARD_FLOPS_FACTOR}x the forward's FLOPs; "
          f"{time.perf_counter() - start:.0f} s in all; rows appended to {path}")


if __name__ == "__main__":
    main()
