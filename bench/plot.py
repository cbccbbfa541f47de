"""Plot one benchmark's newest rows as grouped bars: one group per case, one bar per implementation.

Reads bench/results/<name>.csv (or --csv), keeps the rows of its last commit, and writes
bench/results/<name>.png. The metric is a column of the CSV, e.g. frac_copy_bw (fraction of the
measured copy bandwidth) or tflops.

Usage: python bench/plot.py NAME --case COL[,COL...] --metric COL [--where COL=VALUE ...]
e.g.   python bench/plot.py group_norm --case shape,layout --metric frac_copy_bw --where dtype=fp16
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="benchmark name: reads results/NAME.csv, writes results/NAME.png")
    ap.add_argument("--case", required=True, help="comma-separated columns that name a bar group")
    ap.add_argument("--metric", required=True, help="the column plotted")
    ap.add_argument("--where", action="append", default=[], help="COL=VALUE filter; repeatable")
    ap.add_argument("--csv", type=Path, help="read this CSV instead of results/NAME.csv")
    ap.add_argument("--png", type=Path, help="write this PNG instead of results/NAME.png")
    ap.add_argument("--title", default=None)
    ap.add_argument("--all-commits", action="store_true",
                    help="keep rows of every commit (a run split over calls); later rows win per bar")
    args = ap.parse_args(argv)
    src = args.csv or RESULTS / f"{args.name}.csv"
    dst = args.png or RESULTS / f"{args.name}.png"
    rows = list(csv.DictReader(src.open()))
    last = rows[-1]["commit"]
    commits = ", ".join(dict.fromkeys(r["commit"] for r in rows)) if args.all_commits else last
    filters = [w.split("=", 1) for w in args.where]
    rows = [r for r in rows if (args.all_commits or r["commit"] == last) and all(r.get(k) == v for k, v in filters)
            and r.get(args.metric) not in ("", "nan", None)]
    keys = args.case.split(",")
    case = lambda r: "\n".join(r[k] for k in keys)  # noqa: E731
    cases = list(dict.fromkeys(case(r) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(cases) * max(1, len(impls) / 3)), 4.5))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        vals = {case(r): float(r[args.metric]) for r in rows if r["impl"] == impl}
        ax.bar([j + i * width for j in range(len(cases))], [vals.get(c, 0) for c in cases], width, label=impl)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, fontsize=7)
    ax.set_ylabel(args.metric)
    where = ", ".join(args.where)
    ax.set_title(args.title or f"{args.name} {where} — {rows[0]['gpu']}, commit {commits}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(dst)


if __name__ == "__main__":
    main()
