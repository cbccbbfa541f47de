"""Kernel profile of one Stable Diffusion 1.5 UNet step and one VAE decode on a CUDA GPU, and the
layout copies in them (channels-last end to end should leave none in the step).

Models: fusediff's UNet2DConditionModel with SD 1.5's config (SD15_UNET of fusediff.benchmarks.models) for
one denoising step, batch 2 (classifier-free guidance), 64x64 latents, 77 tokens of width 768; the
SD VAE (SD_VAE) decoding one 64x64 latent to a 512x512 image. Random weights, eval mode, no grad,
the fused kernels (FUSEDIFF_KERNELS=auto). Each call runs twice first (Triton compiles and
autotunes), then once under torch.profiler.

A layout copy is a kernel that moves a tensor from one memory layout to another: cuDNN's and
cuBLAS's conversions (names with nchwToNhwc, nhwcToNchw or transpose), and the kernels of an
``aten::copy_`` whose destination and source have the same shape and different memory orders (what
``.contiguous()``, a reshape that cannot be a view, or a convolution converting its input run).
A copy that only changes the dtype is not one.

Writes, under --out: profile_step_<layout>_<dtype>.md (per model: the top 25 kernels by total
CUDA time with count and share, the layout copies, the total) and profile_step_<layout>_<dtype>.csv
(one row per kernel name and model). Prints the markdown.

Usage: python bench/profile_step.py --out DIR [--layout channels_last|contiguous] [--dtype fp16|bf16]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fusediff import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from fusediff.benchmarks.models import SD15_UNET, SD_VAE  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
TOP = 25
CONVERSION_KERNEL = re.compile(r"nchwToNhwc|nhwcToNchw|transpose", re.IGNORECASE)  # cuDNN/cuBLAS layout conversions
COLUMNS = ["model", "kernel", "count", "total_us", "share", "layout_copy"]


def memory_order(shape, strides) -> tuple[int, ...]:
    """The dims of size > 1, outermost in memory first."""
    return tuple(sorted((d for d in range(len(shape)) if shape[d] > 1), key=lambda d: -strides[d]))


def is_layout_copy(event) -> bool:
    """Whether a profiled CPU op is an ``aten::copy_`` between two memory orders of one shape."""
    if event.name != "aten::copy_":
        return False
    shapes, strides = event.input_shapes, getattr(event, "structured_input_strides", None)
    if not strides or len(shapes) < 2 or len(strides) < 2 or not shapes[0] or shapes[0] != shapes[1]:
        return False
    return memory_order(shapes[0], strides[0]) != memory_order(shapes[1], strides[1])


def summarise(prof) -> dict:
    """Per kernel name (count, total us); the layout-copy kernels (names, count, us); the total (us)."""
    kernels: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            entry = kernels.setdefault(e.name, [0, 0.0])
            entry[0] += 1
            entry[1] += e.time_range.elapsed_us()
    copies: dict[str, list] = {}
    for e in prof.events():  # kernels launched by layout-changing copy_ ops (shapes and strides recorded)
        if e.device_type == DeviceType.CPU and is_layout_copy(e):
            for k in e.kernels:
                entry = copies.setdefault(k.name, [0, 0.0])
                entry[0] += 1
                entry[1] += k.duration
    for name, (count, us) in kernels.items():  # conversions inside cuDNN/cuBLAS calls
        if CONVERSION_KERNEL.search(name) and name not in copies:
            copies[name] = [count, us]
    return {"kernels": kernels, "copies": copies, "total_us": sum(us for _, us in kernels.values())}


def profile_call(fn: Callable[[], object], warmup: int = 2) -> dict:
    """:func:`summarise` of one call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        fn()
        torch.cuda.synchronize()
    return summarise(prof)


def sd_step_and_decode(dtype: torch.dtype, layout: torch.memory_format) -> dict[str, Callable[[], object]]:
    """The two calls to profile, on the GPU in ``dtype`` and ``layout`` (weights and inputs)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval().to("cuda", dtype).to(memory_format=layout)
    vae = AutoencoderKL(**SD_VAE).eval().to("cuda", dtype).to(memory_format=layout)
    x = torch.randn(2, 4, 64, 64, device="cuda", dtype=dtype).contiguous(memory_format=layout)
    t = torch.tensor([500, 500], device="cuda")
    context = torch.randn(2, 77, 768, device="cuda", dtype=dtype)
    z = torch.randn(1, 4, 64, 64, device="cuda", dtype=dtype).contiguous(memory_format=layout)

    @torch.no_grad()
    def step():
        return unet(x, t, context).sample

    @torch.no_grad()
    def decode():
        return vae.decode(z).sample

    return {"unet step b2 64x64": step, "vae decode 512x512": decode}


def rows_of(model: str, summary: dict) -> list[dict]:
    total = summary["total_us"] or 1.0
    ranked = sorted(summary["kernels"].items(), key=lambda kv: -kv[1][1])
    return [dict(model=model, kernel=name, count=count, total_us=round(us, 1), share=round(us / total, 4),
                 layout_copy=name in summary["copies"]) for name, (count, us) in ranked]


def markdown(summaries: dict[str, dict], header: str) -> str:
    def short(name: str) -> str:
        name = name.replace("|", "\\|")
        return name if len(name) <= 110 else name[:107] + "..."

    lines = [f"# Kernel profile: {header}", ""]
    for model, s in summaries.items():
        total = s["total_us"] or 1.0
        copy_count = sum(c for c, _ in s["copies"].values())
        copy_us = sum(us for _, us in s["copies"].values())
        lines += [f"## {model}", "",
                  f"Total CUDA kernel time {s['total_us'] / 1e3:.3f} ms in {sum(c for c, _ in s['kernels'].values())} "
                  f"launches; layout copies: {copy_count} launches, {copy_us / 1e3:.3f} ms "
                  f"({copy_us / total:.1%}).", "",
                  "| kernel | count | total ms | share |", "|---|---:|---:|---:|"]
        for row in rows_of(model, s)[:TOP]:
            mark = " (layout copy)" if row["layout_copy"] else ""
            lines.append(f"| {short(row['kernel'])}{mark} | {row['count']} | {row['total_us'] / 1e3:.3f} | "
                         f"{row['share']:.1%} |")
        if s["copies"]:
            lines += ["", "Layout copies:", ""] + [f"- {short(n)}: {c} launches, {us / 1e3:.3f} ms"
                                                    for n, (c, us) in s["copies"].items()]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the markdown and CSV summaries")
    parser.add_argument("--layout", choices=LAYOUTS, default="channels_last")
    parser.add_argument("--dtype", choices=DTYPES, default="fp16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py needs a CUDA GPU")
    summaries = {model: profile_call(fn)
                 for model, fn in sd_step_and_decode(DTYPES[args.dtype], LAYOUTS[args.layout]).items()}
    header = (f"{args.layout}, {args.dtype}, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"commit {harness.git_commit()}, {datetime.date.today()}")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"profile_step_{args.layout}_{args.dtype}"
    text = markdown(summaries, header)
    stem.with_suffix(".md").write_text(text)
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for model, s in summaries.items():
            writer.writerows(rows_of(model, s))
    print(text)
    print(f"wrote {stem}.md and {stem}.csv")


if __name__ == "__main__":
    main()
