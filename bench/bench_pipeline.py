"""Pipeline benchmark on a CUDA GPU: diffusers and fusediff (eager, fusediff.patch, CUDA graphs, torch.compile)
on an SD 1.5 UNet step, a 512x512 VAE decode, a full 50-step 512x512 text-to-image call and the DDPM
CIFAR-10 UNet at batch 16. The same as ``fusediff bench pipeline``, with bench/results as the default
output; rows, columns and method are in python/fusediff/benchmarks/pipeline.py.

Usage: python bench/bench_pipeline.py [--out DIR] [--rows ROW ...] [--columns COL ...] [--dtype fp16|bf16]
                                      [--steps 50] [--compile-mode MODE] [--report]
e.g.   python bench/bench_pipeline.py --rows diffusers-eager diffusers-patch fusediff-eager fusediff-graph
       python bench/bench_pipeline.py --rows diffusers-compile fusediff-compile
       python bench/bench_pipeline.py --report            # Markdown tables of results/pipeline.csv
       python bench/plot.py pipeline --case column --metric speedup --where dtype=fp16
"""

from __future__ import annotations

import sys
from pathlib import Path

from fusediff.benchmarks.pipeline import main

if __name__ == "__main__":
    sys.exit(main(default_out=Path(__file__).resolve().parent / "results"))
