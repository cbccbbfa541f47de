"""``fusediff bench pipeline``: fusediff against HF diffusers, from one UNet call to a full text-to-image call.

Rows (implementations, ``--rows``; all but the last run by default):
  diffusers-eager        diffusers' models as its users run them by default: contiguous (NCHW), eager.
                         The baseline of the speed-ups, measured in every call.
  diffusers-compile      ``torch.compile(model)`` in the default mode with the models in channels-last, as
                         diffusers' torch.compile guide sets them up; inputs contiguous, as its pipeline passes them.
  diffusers-patch        diffusers' models after ``fusediff.patch(model)`` (fusediff's kernels swapped in); eager, NCHW.
  fusediff-eager         fusediff's models in channels-last, inputs in channels-last, eager.
  fusediff-graph         the same models, each call through ``fusediff.utils.cuda_graph.CUDAGraphCallable``
                         (captured on the first call, replayed after); the pipeline with ``enable_cuda_graph()``.
  fusediff-compile       ``torch.compile(model, fullgraph=True)`` of fusediff's channels-last models.
  fusediff-graph-loop    t2i only: the pipeline with ``enable_cuda_graph(whole_loop=True)``, every step's UNet
                         call and scheduler update replayed as one graph (the warm-up is two calls: the
                         signature's eager first call and the capture).
  diffusers-compile-nchw diffusers-compile with contiguous models: checks that channels-last is the stronger choice.
Columns (``--columns``):
  unet   one step of the SD 1.5-sized UNet2DConditionModel: batch 2 (classifier-free guidance), 64x64x4
         latents, 77x768 text context, called as each library's pipeline calls it.
  vae    AutoencoderKL decode of a 64x64x4 latent into a 512x512 image, batch 1.
  t2i    one StableDiffusionPipeline call: 512x512, ``--steps`` DPM++ 2M steps, guidance 7.5, random prompt
         embeddings (no text encoder), output_type="np"; decoding and post-processing included.
  cifar  google/ddpm-cifar10-32's UNet2DModel, batch 16, one forward.
Random weights, identical in both libraries; ``--dtype`` fp16 (default) or bf16; no grad.

Method. ``ms``: unet/vae/cifar are the ``triton.testing.do_bench`` median of one call (host launch
cost included, L2 cleared before each call); t2i is the host wall clock of a call ending in a device
synchronisation, median of 3 after one warm-up call. ``gpu_ms``: the same call replayed back to back
from a CUDA graph (device time only; for fusediff-graph, the captured callable's model). ``warmup_s``:
the first call (compilation, graph capture, autotuning). FLOPs: torch.utils.flop_counter on diffusers'
eager models (t2i: steps x the UNet step + the decode); ``roofline`` is TFLOP/s over the bf16 matmul
rate measured in the same call. ``max_rel_diff``: max |out - diffusers eager| / max |diffusers eager| on
the same inputs (sanity, not a test). A cell that fails records its error in ``note`` and the run goes on.
Compile rows compile the UNets whole and the VAE's ``decoder`` module (its 1x1 ``post_quant_conv``
stays eager), so the same compiled modules serve the model columns and the pipeline.

This module holds the names, arguments, arithmetic, CSV rows and the report, and imports no torch;
``pipeline_run`` measures. Rows go to ``--out``/pipeline.csv; ``--report`` prints the Markdown tables
of its newest rows (no GPU needed); ``python bench/plot.py pipeline --case column --metric speedup
--where dtype=fp16`` draws the chart.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

from ..utils.cli_types import positive_int


@dataclasses.dataclass(frozen=True)
class Row:
    label: str  # name in the report's tables
    library: str  # "diffusers" or "fusediff": whose model and pipeline classes
    mode: str  # "eager", "compile", "patch", "graph" or "graph-loop"
    channels_last: bool  # models in channels-last
    default: bool = True  # run when --rows is not given
    columns: tuple[str, ...] | None = None  # the only columns it has (None: every column)

    def has(self, column: str) -> bool:
        """Whether the row measures ``column``."""
        return self.columns is None or column in self.columns

    @property
    def inputs_channels_last(self) -> bool:
        """fusediff's pipelines follow the UNet's layout; diffusers' pass contiguous latents."""
        return self.channels_last and self.library == "fusediff"


@dataclasses.dataclass(frozen=True)
class Column:
    label: str  # name in the report's tables
    timing: str  # how ms is measured: "do_bench" (one call) or "wall" (a whole pipeline call)


ROWS = {
    "diffusers-eager": Row("diffusers eager", "diffusers", "eager", False),
    "diffusers-compile": Row("diffusers + torch.compile", "diffusers", "compile", True),
    "diffusers-patch": Row("diffusers + fusediff.patch", "diffusers", "patch", False),
    "fusediff-eager": Row("fusediff eager", "fusediff", "eager", True),
    "fusediff-graph": Row("fusediff + CUDA graphs", "fusediff", "graph", True),
    "fusediff-compile": Row("fusediff + torch.compile", "fusediff", "compile", True),
    "fusediff-graph-loop": Row("fusediff + whole-loop CUDA graph", "fusediff", "graph-loop", True, columns=("t2i",)),
    "diffusers-compile-nchw": Row("diffusers + torch.compile, NCHW", "diffusers", "compile", False, default=False),
}
BASELINE = "diffusers-eager"
COLUMNS = {
    "unet": Column("UNet step", "do_bench"),
    "vae": Column("VAE decode 512x512", "do_bench"),
    "t2i": Column("text-to-image 512x512", "wall"),
    "cifar": Column("CIFAR-10 UNet, batch 16", "do_bench"),
}
DTYPES = ("fp16", "bf16")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
CSV_NAME = "pipeline.csv"
# date, commit and gpu come first (harness.append_rows)
CSV_FIELDS = ["run_id", "impl", "column", "library", "mode", "layout", "input_layout", "dtype", "steps", "timing",
              "ms", "gpu_ms", "speedup", "gpu_speedup", "gflop", "tflops", "roofline", "gpu_roofline",
              "peak_tflops", "warmup_s", "max_rel_diff", "graph_breaks", "graphs", "compile_mode", "torch", "diffusers",
              "note"]
TABLE_FIELDS = ["impl", "column", "ms", "gpu_ms", "speedup", "gpu_speedup", "roofline", "warmup_s", "max_rel_diff",
                "note"]
# the pipeline benchmark's targets (ms and speedups), checked by --report
UNET_MS, UNET_VS_EAGER, UNET_VS_COMPILE, VAE_MS, T2I_MS, PATCH_VS_EAGER = 8.0, 3.3, 1.5, 8.0, 450.0, 1.5
LOOP_VS_STEP_GRAPHS = 0.85  # t2i with whole-loop graphs over t2i with per-step graphs (issue 16)


class BenchUnavailable(RuntimeError):
    """This machine cannot run the benchmark (no CUDA GPU, no diffusers, no Triton); one line says why."""


# -- names -------------------------------------------------------------------------------------
def parse_names(values: str | Sequence[str], known: Sequence[str], what: str) -> list[str]:
    """Names from ``values`` (strings, each comma-separated), checked against ``known``; ValueError names any other."""
    values = [values] if isinstance(values, str) else list(values)
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(map(repr, unknown))} (choose from {', '.join(known)})")
    if not names:
        raise ValueError(f"no {what} given (choose from {', '.join(known)})")
    return names


def select(requested: Sequence[str] | None, known: dict, baseline: str | None = None) -> list[str]:
    """The requested names (default: those marked default) in ``known``'s order, ``baseline`` always included."""
    if requested is None:
        chosen = {n for n, spec in known.items() if getattr(spec, "default", True)}
    else:
        chosen = set(requested)
    if baseline is not None:
        chosen.add(baseline)
    return [n for n in known if n in chosen]


def _names_type(known: dict, what: str):
    def parse(text: str) -> list[str]:
        try:
            return parse_names(text, list(known), what)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


# -- arithmetic ----------------------------------------------------------------------------------
def _number(x: object) -> float | None:
    try:
        value = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if value == value and value > 0 else None  # no NaN, no zero or negative times


def speedup(base_ms: object, ms: object) -> float | str:
    """``base_ms / ms`` rounded to 2 decimals, or "" when either time is missing."""
    base, t = _number(base_ms), _number(ms)
    return round(base / t, 2) if base and t else ""


def tflops(flop: object, ms: object) -> float | None:
    """TFLOP/s of ``flop`` operations done in ``ms`` milliseconds, or None."""
    work, t = _number(flop), _number(ms)
    return work / t / 1e9 if work and t else None


def roofline(flop: object, ms: object, peak_tflops: object) -> float | str:
    """Fraction of the measured matmul rate, ``tflops / peak``, rounded to 3 decimals, or ""."""
    rate, peak = tflops(flop, ms), _number(peak_tflops)
    return round(rate / peak, 3) if rate and peak else ""


def _round(x: object, digits: int) -> float | str:
    value = _number(x)
    return round(value, digits) if value is not None else ""


def make_rows(cells: list[dict], peak_tflops: float, *, dtype: str, steps: int, compile_mode: str,
              versions: dict[str, str], run_id: str) -> list[dict]:
    """CSV rows (``CSV_FIELDS`` order) from measured cells, speed-ups against this run's diffusers-eager cells.

    A cell is a dict with impl, column and any of ms, gpu_ms, flop, warmup_s, max_rel_diff,
    graph_breaks, graphs (dynamo graphs compiled during the cell), note.
    """
    base = {c["column"]: c for c in cells if c["impl"] == BASELINE}
    out = []
    for c in cells:
        row, column = ROWS[c["impl"]], COLUMNS[c["column"]]
        ref = base.get(c["column"], {})
        ms, gpu_ms, flop = c.get("ms"), c.get("gpu_ms"), c.get("flop")
        rate = tflops(flop, ms)
        diff = c.get("max_rel_diff")
        out.append(dict(
            run_id=run_id, impl=c["impl"], column=c["column"], library=row.library, mode=row.mode,
            layout="channels_last" if row.channels_last else "contiguous",
            input_layout="channels_last" if row.inputs_channels_last else "contiguous",
            dtype=dtype, steps=steps if c["column"] == "t2i" else "", timing=column.timing,
            ms=_round(ms, 3), gpu_ms=_round(gpu_ms, 3),
            speedup=speedup(ref.get("ms"), ms), gpu_speedup=speedup(ref.get("gpu_ms"), gpu_ms),
            gflop=_round(_number(flop) / 1e9, 3) if _number(flop) else "",
            tflops=round(rate, 1) if rate else "", roofline=roofline(flop, ms, peak_tflops),
            gpu_roofline=roofline(flop, gpu_ms, peak_tflops), peak_tflops=_round(peak_tflops, 1),
            warmup_s=_round(c.get("warmup_s"), 2),
            max_rel_diff=f"{diff:.2e}" if isinstance(diff, float) else "",
            graph_breaks=c.get("graph_breaks", ""), graphs=c.get("graphs", ""),
            compile_mode=compile_mode if row.mode == "compile" else "",
            torch=versions.get("torch", ""), diffusers=versions.get("diffusers", ""), note=c.get("note", "")))
    return out


# -- the report (from the CSV) -----------------------------------------------------------------
def newest(rows: list[dict]) -> list[dict]:
    """The last row of each (impl, column) among rows of the CSV's last GPU and dtype, in table order (a run
    split over several calls, or a cell re-measured at a later commit, reads as one table; each row names
    its commit, and its speed-ups are against the diffusers-eager row of its own call)."""
    if not rows:
        return []
    last = rows[-1]
    keep: dict[tuple[str, str], dict] = {}
    for r in rows:
        if all(r.get(k) == last.get(k) for k in ("gpu", "dtype")) and r.get("impl") in ROWS \
                and r.get("column") in COLUMNS:
            keep[(r["impl"], r["column"])] = r
    order = {(i, c): (a, b) for a, i in enumerate(ROWS) for b, c in enumerate(COLUMNS)}
    return [keep[k] for k in sorted(keep, key=order.__getitem__)]


def _cell(r: dict | None, time_key: str, speedup_key: str, roofline_key: str) -> str:
    if r is None:
        return ""
    if not _number(r.get(time_key)):
        return "failed" if r.get("note") and time_key == "ms" else ""
    return f"{float(r[time_key]):.4g} ms · {r[speedup_key] or '?'}x · {r[roofline_key] or '?'}"


def markdown(rows: list[dict]) -> str:
    """Markdown tables of :func:`newest` rows: time · speed-up over diffusers eager · roofline, per cell."""
    rows = newest(rows)
    if not rows:
        return "(no rows)"
    by = {(r["impl"], r["column"]): r for r in rows}
    impls = [i for i in ROWS if any(k[0] == i for k in by)]
    cols = [c for c in COLUMNS if any(k[1] == c for k in by)]
    last = rows[-1]
    steps = next((r["steps"] for r in rows if r["column"] == "t2i"), "")
    commits = ", ".join(dict.fromkeys(r.get("commit", "") for r in rows))
    lines = [f"{last.get('gpu')}, commits {commits}, {last.get('date')}, {last.get('dtype')}, "
             f"torch {last.get('torch')}, diffusers {last.get('diffusers')}; bf16 matmul rate measured "
             f"{last.get('peak_tflops')} TFLOP/s" + (f"; text-to-image: {steps} steps" if steps else "") +
             ". Cells: time · speed-up over diffusers eager · roofline (TFLOP/s over the matmul rate).", ""]

    def table(title: str, columns: list[str], time_key: str, speedup_key: str, roofline_key: str) -> None:
        lines.append(f"| {title} | layout | " + " | ".join(COLUMNS[c].label for c in columns) + " |")
        lines.append("|---" * (len(columns) + 2) + "|")
        for i in impls:
            layout = next((by[i, c]["layout"] for c in cols if (i, c) in by), "")
            cells = [_cell(by.get((i, c)), time_key, speedup_key, roofline_key) for c in columns]
            lines.append(f"| {ROWS[i].label} | {layout} | " + " | ".join(cells) + " |")
        lines.append("")

    table("Host-inclusive (do_bench; t2i wall clock)", cols, "ms", "speedup", "roofline")
    table("GPU time (CUDA-graph replay)", [c for c in cols if COLUMNS[c].timing == "do_bench"],
          "gpu_ms", "gpu_speedup", "gpu_roofline")
    lines.append("| warm-up s / max rel. diff | " + " | ".join(COLUMNS[c].label for c in cols) + " |")
    lines.append("|---" * (len(cols) + 1) + "|")
    for i in impls:
        cells = [f"{by[i, c]['warmup_s']} / {by[i, c]['max_rel_diff'] or '-'}" if (i, c) in by else "" for c in cols]
        lines.append(f"| {ROWS[i].label} | " + " | ".join(cells) + " |")
    notes = [f"- {ROWS[r['impl']].label}, {r['column']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(lines + ([""] + notes if notes else []) + [""] + targets(rows))


def targets(rows: list[dict]) -> list[str]:
    """One line per target, from :func:`newest` rows: the figure, the target, met or not."""
    by = {(r["impl"], r["column"]): r for r in newest(rows)}

    def best(column: str, library: str, mode: str | None = None) -> tuple[str, float] | None:
        found = [(i, _number(r.get("ms"))) for (i, c), r in by.items() if c == column
                 and ROWS[i].library == library and (mode is None or ROWS[i].mode == mode) and _number(r.get("ms"))]
        return min(found, key=lambda x: x[1]) if found else None

    def line(what: str, value: float | None, goal: float, at_most: bool, unit: str, who: str = "") -> str:
        if value is None:
            return f"- {what}: not measured"
        met = value <= goal if at_most else value >= goal
        sign = "<=" if at_most else ">="
        return f"- {what}: {value:.3g}{unit}{who} (target {sign} {goal:g}{unit}): {'met' if met else 'NOT met'}"

    out = []
    ours = best("unet", "fusediff")
    compiled = best("unet", "diffusers", "compile")
    who = f", {ours[0]}" if ours else ""
    out.append(line("UNet step, best fusediff row", ours and ours[1], UNET_MS, True, " ms", who))
    vs_eager = ours and _number(by[ours[0], "unet"].get("speedup"))  # against its own call's diffusers eager
    out.append(line("UNet step, speed-up over diffusers eager", vs_eager, UNET_VS_EAGER, False, "x", who))
    if ours and compiled and by[ours[0], "unet"].get("run_id") != by[compiled[0], "unet"].get("run_id"):
        who += f" (measured in another call than {compiled[0]})"
    out.append(line(f"UNet step, speed-up over the best diffusers + torch.compile ({compiled[0] if compiled else '-'})",
                    ours and compiled and compiled[1] / ours[1], UNET_VS_COMPILE, False, "x", who))
    for column, goal in (("vae", VAE_MS), ("t2i", T2I_MS)):
        found = best(column, "fusediff")
        out.append(line(f"{COLUMNS[column].label}, best fusediff row", found and found[1], goal, True, " ms",
                        f", {found[0]}" if found else ""))
    loop, step = (_number(by.get((r, "t2i"), {}).get("ms")) for r in ("fusediff-graph-loop", "fusediff-graph"))
    out.append(line("text-to-image, whole-loop graph over per-step graphs", loop and step and loop / step,
                    LOOP_VS_STEP_GRAPHS, True, "x"))
    patched = _number(by.get(("diffusers-patch", "unet"), {}).get("speedup"))
    out.append(line("UNet step, diffusers + fusediff.patch over diffusers eager", patched, PATCH_VS_EAGER, False, "x"))
    return out


# -- arguments and running -------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser, default_out: Path) -> None:
    parser.add_argument("--out", type=Path, default=default_out,
                        help=f"directory of {CSV_NAME}, appended to (default: {default_out})")
    parser.add_argument("--rows", nargs="+", type=_names_type(ROWS, "row"), default=None, metavar="ROW",
                        help=f"implementations, space- or comma-separated: {', '.join(ROWS)} (default: all "
                             f"but diffusers-compile-nchw; {BASELINE} is always measured, as the baseline)")
    parser.add_argument("--columns", nargs="+", type=_names_type(COLUMNS, "column"), default=None,
                        metavar="COLUMN", help=f"what is timed: {', '.join(COLUMNS)} (default: all)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp16")
    parser.add_argument("--steps", type=positive_int, default=50, help="denoising steps of the t2i column (default: 50)")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                        help="torch.compile mode of the compile rows (default: default)")
    parser.add_argument("--report", action="store_true",
                        help=f"print the Markdown tables of the newest rows of --out/{CSV_NAME} and the targets; "
                             "measures nothing (no GPU needed)")


def _flatten(groups: list[list[str]] | None) -> list[str] | None:
    return None if groups is None else [n for g in groups for n in g]


def check_environment() -> None:
    """Raise :class:`BenchUnavailable` unless a CUDA GPU, HF diffusers and Triton are present."""
    import torch

    if not torch.cuda.is_available():
        raise BenchUnavailable("bench pipeline needs a CUDA GPU, and torch sees none")
    for name, hint in (("diffusers", "pip install diffusers==0.42.1"), ("triton", "pip install triton")):
        try:
            found = importlib.util.find_spec(name) is not None
        except ValueError:  # a module in sys.modules without a spec
            found = name in sys.modules and sys.modules[name] is not None
        if not found:
            raise BenchUnavailable(f"bench pipeline compares with HF diffusers, which is not installed ({hint})"
                                   if name == "diffusers" else f"bench pipeline needs {name} ({hint})")


def run(args: argparse.Namespace) -> int:
    """Measure (or with ``--report``, summarise) as ``args`` say; returns the exit status."""
    path = Path(args.out) / CSV_NAME
    if args.report:
        if not path.is_file():
            raise BenchUnavailable(f"--report: no {path}")
        with path.open(newline="") as f:
            print(markdown(list(csv.DictReader(f))))
        return 0
    check_environment()
    from . import harness, pipeline_run

    rows, columns = select(_flatten(args.rows), ROWS, BASELINE), select(_flatten(args.columns), COLUMNS)
    run_id = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"fusediff bench pipeline: rows {', '.join(rows)}; columns {', '.join(columns)}; {args.dtype}", flush=True)
    done: list[dict] = []  # cells measured so far
    table: list[dict] = []  # their CSV rows

    def emit(cells: list[dict], peak: float, versions: dict[str, str]) -> None:
        """Append a finished row's CSV rows at once: a run stopped by a time limit keeps them."""
        done.extend(cells)
        new = make_rows(done, peak, dtype=args.dtype, steps=args.steps, compile_mode=args.compile_mode,
                        versions=versions, run_id=run_id)[len(table):]
        if new:
            path = harness.append_rows(CSV_NAME, new, args.out)
            print(f"appended {len(new)} rows to {path}", flush=True)
        table.extend(new)

    pipeline_run.measure(rows, columns, args.dtype, args.steps, args.compile_mode, emit=emit)
    harness.print_table(table, TABLE_FIELDS)
    failed = [r for r in table if not r["ms"]]
    if failed:
        print(f"{len(failed)} of {len(table)} cells failed; their errors are in the note column")
    return 0 if len(failed) < len(table) else 1


def main(argv: Sequence[str] | None = None, default_out: Path = Path(".")) -> int:
    """``bench/bench_pipeline.py``'s entry point: errors end as one line on stderr, status 2 or 1."""
    parser = argparse.ArgumentParser(prog="bench_pipeline.py", description=__doc__.splitlines()[0],
                                     epilog="See fusediff/benchmarks/pipeline.py for rows, columns and method.")
    add_arguments(parser, default_out)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except BenchUnavailable as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
