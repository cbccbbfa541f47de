"""The benchmark harness for the scripts in bench/: ``fusediff.benchmarks.harness`` re-exported, with
bench/results/ as the default output directory of :func:`append_rows`.

The harness lives in the package so that ``fusediff bench ...`` works from an installed wheel; see
that module for the timing method (``triton.testing.do_bench``, CUDA-graph replay) and ceilings.
"""

from __future__ import annotations

from pathlib import Path

from fusediff.benchmarks import harness as _harness
from fusediff.benchmarks.harness import (
    copy_bandwidth_gbps,
    device_name,
    do_bench_ms,
    git_commit,
    graph_call_ms,
    graph_rotating_ms,
    kernel_times_us,
    matmul_tflops,
    print_table,
    wall_ms,
)

__all__ = ["RESULTS", "append_rows", "copy_bandwidth_gbps", "device_name", "do_bench_ms", "git_commit",
           "graph_call_ms", "graph_rotating_ms", "kernel_times_us", "matmul_tflops", "print_table", "wall_ms"]

RESULTS = Path(__file__).resolve().parent / "results"


def append_rows(csv_name: str, rows: list[dict], out_dir: Path | None = None) -> Path:
    """Append rows to ``out_dir/csv_name`` (default bench/results/), stamped with GPU, commit and date."""
    return _harness.append_rows(csv_name, rows, out_dir or RESULTS)
