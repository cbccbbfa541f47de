"""Benchmark of the Stable Diffusion models at SD 1.5 size on a CUDA GPU, fusediff against diffusers.

Rows (random weights, the same in both libraries, eval mode, no grad):
  unet   UNet2DConditionModel with SD 1.5's config, batch 2 (classifier-free guidance), 64x64
         latents, 77 text tokens of width 768: one denoising step;
  decode AutoencoderKL with SD's config: decode of a 64x64 latent to a 512x512 image, batch 1.
Implementations: diffusers eager, fusediff eager (fused kernels), fusediff with the reference ops
(FUSEDIFF_KERNELS=ref), and, with --compile, diffusers under torch.compile. ms is the
triton.testing.do_bench median of an eager call (host launch cost included where it exceeds the
GPU time); graph_ms replays the same call from a CUDA graph (GPU time only). TFLOP/s counts the
model's matmul, conv and attention FLOPs with torch.utils.flop_counter, and the roofline
fraction is against the measured bf16 matmul rate. max_rel_diff is the largest |fusediff - diffusers| over the largest |diffusers| (fp16
rounding differences, accumulated through the model).

The models run as loaded: no layout change and no compile (bench_pipeline.py times those).

Usage: python bench/bench_sd_models.py [--out DIR] [--dtype fp16|bf16] [--compile]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fusediff import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from fusediff import kernels as K  # noqa: E402
from fusediff.benchmarks.models import SD15_UNET, SD_VAE, flops  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
COLUMNS = ["model", "dtype", "impl", "ms", "graph_ms", "tflops", "roofline", "speedup", "max_rel_diff"]


def pair(theirs_cls, ours_cls, config: dict, dtype: torch.dtype):
    """diffusers' model from seed 0 and fusediff's with the same weights, on the GPU in ``dtype``."""
    torch.manual_seed(0)
    theirs = theirs_cls(**config).eval()
    ours = ours_cls(**config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs.to("cuda", dtype), ours.to("cuda", dtype)


def cases(dtype: torch.dtype):
    """(model name, diffusers callable, fusediff callable, run) per model; run(f) calls f on the inputs."""
    import diffusers

    theirs, ours = pair(diffusers.UNet2DConditionModel, UNet2DConditionModel, SD15_UNET, dtype)
    x = torch.randn(2, 4, 64, 64, device="cuda", dtype=dtype)
    t = torch.tensor([500, 500], device="cuda")
    cond = torch.randn(2, 77, 768, device="cuda", dtype=dtype)
    yield "unet sd1.5 b2 64x64", theirs, ours, lambda f: f(x, t, cond).sample
    del theirs, ours
    theirs, ours = pair(diffusers.AutoencoderKL, AutoencoderKL, SD_VAE, dtype)
    z = torch.randn(1, 4, 64, 64, device="cuda", dtype=dtype)
    yield "vae decode 512x512", theirs.decode, ours.decode, lambda f: f(z).sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="directory for the CSV (default bench/results)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp16")
    parser.add_argument("--compile", action="store_true", help="also time diffusers under torch.compile")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    peak = harness.matmul_tflops()
    rows = []
    with torch.no_grad():
        for name, theirs, ours, run in cases(dtype):
            work = flops(lambda: run(theirs))
            expected = run(theirs).float()
            impls = {"diffusers eager": theirs, "fusediff eager": ours}
            if args.compile:
                impls["diffusers compile"] = torch.compile(theirs)
            base = None
            for impl, f in impls.items():
                ms = harness.do_bench_ms(lambda: run(f))
                base = base or ms
                diff = (run(f).float() - expected).abs().max().item() / expected.abs().max().item()
                rows.append(row(name, args.dtype, impl, ms, work, peak, base, f"{diff:.2e}"))
                rows[-1]["graph_ms"] = graph_ms(lambda: run(f))
            with K.use_backend("ref"):
                ms = harness.do_bench_ms(lambda: run(ours))
            rows.append(row(name, args.dtype, "fusediff ref ops", ms, work, peak, base, ""))
            rows[-1]["graph_ms"] = ""
            print(f"{name}: {work / 1e12:.3f} TFLOP per call; bf16 matmul rate measured {peak:.0f} TFLOP/s")
            torch.cuda.empty_cache()
    harness.print_table(rows, COLUMNS)
    print("wrote", harness.append_rows("sd_models.csv", rows, args.out))


def graph_ms(fn) -> float | str:
    """Milliseconds per call replayed from a CUDA graph (device time, no host launch cost), or why not."""
    try:
        return round(harness.graph_call_ms(fn), 3)
    except Exception as e:  # e.g. a host synchronisation inside the model
        torch.cuda.synchronize()
        return f"no graph: {type(e).__name__}"


def row(model: str, dtype: str, impl: str, ms: float, work: float, peak: float, base: float, diff: str) -> dict:
    tflops = work / ms / 1e9
    return dict(model=model, dtype=dtype, impl=impl, ms=round(ms, 3), tflops=round(tflops, 1),
                roofline=round(tflops / peak, 3), speedup=round(base / ms, 2), max_rel_diff=diff)


if __name__ == "__main__":
    main()
