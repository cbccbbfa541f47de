"""Host (Python) profile of one eager SD 1.5 UNet step on a CUDA GPU: where the wall time that is not GPU work
goes, for fusediff and for diffusers, in the same run.

Each row builds the model as ``bench_pipeline.py``'s row of that name does (SD 1.5 config, shared random
weights, fp16, batch 2, 64x64 latents, 77 tokens; fusediff in channels-last), warms it up (Triton compiles
and autotunes), then measures:
- wall ms per call: median of --repeat timed groups of --calls back-to-back calls ending in a sync;
- host ms per call: one call timed without a sync while a spin kernel holds the GPU (its launches only
  queue), the median of 2 * --repeat + 1;
- CUDA kernel launches and ATen ops per call (torch.profiler over one call);
- cProfile over --calls calls: the functions with the most own time, and the most cumulative time.

Writes, under --out: profile_host.md (the tables for every row) and profile_host_<row>.txt (pstats, top 80 by
own time). Prints the markdown.

Usage: python bench/profile_host.py --out DIR [--rows fusediff-eager diffusers-eager] [--calls 20]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from fusediff.benchmarks.pipeline import ROWS
from fusediff.benchmarks.pipeline_run import _Bench

TOP = 30


def _wall(fn, inputs, calls: int, repeat: int) -> float:
    """Median ms per call over ``repeat`` groups of ``calls`` calls, each ending in a sync."""
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn(*inputs)
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3 / calls)
    return statistics.median(times)


def _host(fn, inputs, repeat: int) -> float:
    """Median ms of the host's part of one call: the GPU is held busy by a spin kernel first, so the call's
    launches only queue (one call's few hundred fit in the launch queue) and the host never waits on it."""
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU cycles
        start = time.perf_counter()
        fn(*inputs)
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def _counts(fn, inputs) -> tuple[int, int]:
    """(CUDA kernel launches, top-level ATen ops) in one call."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn(*inputs)
        torch.cuda.synchronize()
    events = prof.events()
    kernels = sum(1 for e in events if e.device_type == DeviceType.CUDA)
    aten = sum(1 for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")
               and e.cpu_parent is None)
    return kernels, aten


def _cprofile(fn, inputs, calls: int) -> pstats.Stats:
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(calls):
        fn(*inputs)
    torch.cuda.synchronize()
    prof.disable()
    return pstats.Stats(prof)


def _table(stats: pstats.Stats, calls: int, key: str) -> list[str]:
    """Markdown rows of the TOP functions by ``key`` ("tottime" or "cumtime"), per model call."""
    entries = []
    for (path, line, name), (_cc, nc, tt, ct, _callers) in stats.stats.items():
        entries.append((tt if key == "tottime" else ct, tt, ct, nc, f"{Path(path).name}:{line}({name})"))
    entries.sort(reverse=True)
    out = ["| function | calls/step | own µs/step | cumulative µs/step |", "|---|---|---|---|"]
    for _, tt, ct, nc, where in entries[:TOP]:
        out.append(f"| `{where}` | {nc / calls:.0f} | {tt * 1e6 / calls:.0f} | {ct * 1e6 / calls:.0f} |")
    return out


def profile_row(name: str, bench: _Bench, calls: int, repeat: int, out: Path) -> list[str]:
    spec = ROWS[name]
    models = {"unet": bench.model(spec, "UNet2DConditionModel")}
    fn, inputs = bench.call(spec, "unet", models)
    with torch.no_grad():
        for _ in range(3):
            fn(*inputs)
        torch.cuda.synchronize()
        wall = _wall(fn, inputs, calls, repeat)
        host = _host(fn, inputs, 2 * repeat + 1)
        kernels, aten = _counts(fn, inputs)
        stats = _cprofile(fn, inputs, calls)
    buf = io.StringIO()
    pstats.Stats(stats, stream=buf).sort_stats("tottime").print_stats(80)
    (out / f"profile_host_{name}.txt").write_text(buf.getvalue())
    total = stats.total_tt * 1e3 / calls
    lines = [f"### {spec.label} (`{name}`)", "",
             f"wall {wall:.2f} ms/call (sync each call); host {host:.2f} ms/call (GPU held busy); "
             f"{kernels} CUDA kernels and {aten} top-level ATen ops per call; cProfile total {total:.1f} ms/call "
             "(profiled, so slower than the host figure)", "", "Most own time:", ""]
    lines += _table(stats, calls, "tottime")
    lines += ["", "Most cumulative time:", ""] + _table(stats, calls, "cumtime") + [""]
    del models
    torch.cuda.empty_cache()
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", nargs="+", default=["fusediff-eager", "diffusers-eager"], choices=sorted(ROWS))
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_host.py needs a CUDA GPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    bench = _Bench(torch.float16, steps=1, compile_mode="default", log=print)
    lines = [f"# Host profile of one eager SD 1.5 UNet step ({torch.cuda.get_device_name()}, torch "
             f"{torch.__version__})", ""]
    for name in args.rows:
        if ROWS[name].mode not in ("eager", "patch"):
            raise SystemExit(f"--rows: {name} is not an eager row")
        lines += profile_row(name, bench, args.calls, args.repeat, args.out)
    text = "\n".join(lines)
    (args.out / "profile_host.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
