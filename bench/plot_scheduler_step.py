"""Plot bench/results/scheduler_step.csv (newest commit's rows) to bench/results/scheduler_step.png:
effective bandwidth per rule and shape for each implementation, as a fraction of copy bandwidth.
Usage: python bench/plot_scheduler_step.py [CSV] [PNG]"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str]) -> None:
    src = Path(argv[0]) if argv else RESULTS / "scheduler_step.csv"
    dst = Path(argv[1]) if len(argv) > 1 else RESULTS / "scheduler_step.png"
    rows = list(csv.DictReader(src.open()))
    last = rows[-1]["commit"]
    rows = [r for r in rows if r["commit"] == last and r["op"] == "scheduler_step" and r["us_graph"] != "nan"]
    cases = list(dict.fromkeys(f"{r['rule']}\n{r['shape']}\n{r['dtype']}" for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        vals = {f"{r['rule']}\n{r['shape']}\n{r['dtype']}": float(r["frac_copy_bw"]) for r in rows if r["impl"] == impl}
        ax.bar([j + i * width for j in range(len(cases))], [vals.get(c, 0) for c in cases], width, label=impl)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, fontsize=7)
    ax.set_ylabel("fraction of measured copy bandwidth")
    ax.set_title(f"fused scheduler step, CUDA-graph replay over L2-rotated inputs — {rows[0]['gpu']}, commit {last}")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(dst)


if __name__ == "__main__":
    main(sys.argv[1:])
