"""Shared benchmark harness: timing, device ceilings, and result rows.

Kernel times come from ``triton.testing.do_bench`` (median after warm-up; it clears L2 with a
256 MB write before each run, so inputs never sit in cache and the host's launch cost hides
behind that write). Ceilings are measured on the device in the same run: copy bandwidth from
a large device-to-device copy (bytes read + written), matmul rate from an 8192^3 bf16 product.
Rows are appended to CSV files stamped with the GPU, the commit and the date. ``bench/harness.py``
re-exports this module with ``bench/results`` as the default output directory.
"""

from __future__ import annotations

import csv
import datetime
import functools
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..utils.cuda_graph import capture


def do_bench_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of one call of ``fn`` on the GPU, L2 cleared before each call."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median"))


def wall_ms(fn: Callable[[], object], repeat: int = 20, warmup: int = 3) -> float:
    """Median host wall-clock milliseconds of ``fn`` followed by a device synchronisation."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def graph_rotating_ms(fn: Callable[..., object], make_inputs: Callable[[], tuple], nbytes: int,
                      min_calls: int = 50, reps: int = 10) -> float:
    """Milliseconds per call of ``fn(*inputs)`` replayed back to back from a CUDA graph.

    Input sets are rotated so that together they span 3x the L2 cache: each call reads its
    inputs from device memory, as a step does once a model has run in between. Launch gaps
    inside a graph are about a microsecond, so this is the time a graph-captured loop pays.
    """
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    nsets = max(1, -(-3 * l2 // max(nbytes, 1)))
    sets = [make_inputs() for _ in range(nsets)]
    calls = max(min_calls, nsets)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for inputs in sets:
            fn(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with capture(graph):
        for k in range(calls):
            fn(*sets[k % nsets])
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return sorted(times)[len(times) // 2]


def graph_call_ms(fn: Callable[..., object], inputs: tuple = ()) -> float:
    """Milliseconds per call of ``fn(*inputs)`` replayed from a CUDA graph, for a call as large as a model
    step: one input set (it is far larger than L2 already), 5 calls a replay, median of 5 replays."""
    return graph_rotating_ms(fn, lambda: inputs, nbytes=1 << 40, min_calls=5, reps=5)


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read plus written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = do_bench_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


@functools.lru_cache(maxsize=None)
def matmul_tflops(n: int = 8192) -> float:
    """Measured bf16 matmul rate in TFLOP/s on random data."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = do_bench_ms(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


def git_commit() -> str:
    env = os.environ.get("FUSEDIFF_COMMIT")
    if env:
        return env
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def append_rows(csv_name: str, rows: list[dict], out_dir: str | Path) -> Path:
    """Append rows to ``out_dir/csv_name``, stamped with GPU, commit and date; returns the path.

    The columns are the union of the rows' keys (a failed row's ``note`` included); when a row brings a
    column the file's header lacks, the file is rewritten with the wider header (atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / csv_name
    stamp = {"date": datetime.date.today().isoformat(), "commit": git_commit(), "gpu": device_name()}
    rows = [{**stamp, **r} for r in rows]
    fields = list(dict.fromkeys(k for r in rows for k in r))
    old_rows: list[dict] = []
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            if set(fields) <= set(header):
                fields = None
            else:
                old_rows = list(reader)
                fields = header + [k for k in fields if k not in header]
        if fields is None:
            with path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=header).writerows(rows)
            return path
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(old_rows + rows)
    os.replace(tmp, path)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A plain fixed-width table of ``columns`` on stdout."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def kernel_times_us(fn: Callable[[], object], reps: int = 5) -> dict[str, float]:
    """Device microseconds per call of each kernel ``fn`` launches (torch.profiler), by kernel name."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name] = times.get(event.name, 0.0) + event.device_time / reps
    return times
