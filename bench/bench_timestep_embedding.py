"""Benchmark of the timestep embedding (fusediff.kernels.timestep_embedding) and the time MLP
(fusediff.kernels.timestep_mlp) on a CUDA GPU, against diffusers eager (target: 5x).

Both ops are launch-bound (a few KB to a few MB), so every row has three measures:
  gpu_us   triton.testing.do_bench median with L2 cleared before each call: GPU time only, the
           host's launches hidden behind the 256 MB clearing write;
  wall_us  host wall time per call in eager mode: harness.wall_ms of a loop of LOOP calls and
           one synchronisation, divided by LOOP (the launch cost, or the GPU time if larger);
  kernels  CUDA kernels one call runs, counted by torch.profiler (memcpy/memset separately).
Speedups are against diffusers eager in the same group (op, size, batch, dtype).

(a) op=embedding, int64 timesteps to (N, dim) float32: fusediff's Triton kernel; fusediff's
    reference (timestep_embedding_ref); diffusers' get_timestep_embedding; torch.compile of the
    reference. max_abs_diff: against fusediff's reference (0 = diffusers' exact values).
(b) op=time_mlp, Timesteps + cast + TimestepEmbedding(silu), SD sizes (320 -> 1280 -> 1280,
    flip, shift 0) and DDPM CIFAR-10 (128 -> 512 -> 512, shift 1), fp16 and fp32: fusediff's
    timestep_mlp (plan "auto"; column plan says which it took), and its plans "one" (one
    launch) and "two" (two launches) forced; fusediff's two modules (Timesteps, then
    TimestepEmbedding: the embedding kernel and three torch ops); diffusers' modules eager and
    under torch.compile. max_abs_diff: against the reference with float64 weights.
Batches 2, 16 and 128. Without diffusers its rows are skipped with a note. Rows go to
bench/results/timestep_embedding.csv (or --out DIR).

Usage: python bench/bench_timestep_embedding.py [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fusediff import kernels as K  # noqa: E402
from fusediff.kernels import timestep_embedding_ref, timestep_mlp_ref  # noqa: E402
from fusediff.models.embeddings import TimestepEmbedding, Timesteps  # noqa: E402

BATCHES = (2, 16, 128)
EMB_DIMS = {"sd": 320, "cifar": 128}
MLP_SIZES = {  # name: (dim, hidden = out_features, flip_sin_to_cos, downscale_freq_shift)
    "sd 320-1280-1280": (320, 1280, True, 0.0),
    "cifar 128-512-512": (128, 512, False, 1.0),
}
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
LOOP = 50  # calls per wall-clock sample
COLUMNS = ["op", "size", "batch", "dtype", "impl", "plan", "kernels", "gpu_us", "wall_us", "speedup_gpu",
           "speedup_wall", "max_abs_diff"]


def kernel_counts(fn) -> tuple[int, int]:
    """(kernels, memcpy/memset operations) one call of ``fn`` runs on the GPU, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = sum(1 for n in names if n.startswith(("Memcpy", "Memset")))
    return len(names) - copies, copies


def measure(fn, want: torch.Tensor | None) -> dict:
    """Times, kernel count and largest difference from ``want`` of one implementation."""
    with torch.no_grad():
        got = fn()
        kernels, copies = kernel_counts(fn)
        gpu_ms = harness.do_bench_ms(fn)
        wall_ms = harness.wall_ms(lambda: [fn() for _ in range(LOOP)], repeat=10, warmup=2) / LOOP
    diff = "" if want is None else f"{(got.double() - want.double()).abs().max().item():.1e}"
    return dict(kernels=kernels if not copies else f"{kernels}+{copies} copies", gpu_us=round(gpu_ms * 1e3, 2),
                wall_us=round(wall_ms * 1e3, 2), max_abs_diff=diff)


def with_speedups(rows: list[dict]) -> list[dict]:
    """speedup_gpu / speedup_wall against the group's diffusers eager row (blank without one)."""
    base = next((r for r in rows if r["impl"] == "diffusers eager"), None)
    for r in rows:
        r["speedup_gpu"] = round(base["gpu_us"] / r["gpu_us"], 2) if base else ""
        r["speedup_wall"] = round(base["wall_us"] / r["wall_us"], 2) if base else ""
    return rows


def diffusers_embeddings():
    """diffusers.models.embeddings, or None (with a note) where diffusers is not installed."""
    try:
        from diffusers.models import embeddings
    except ImportError as err:
        print(f"note: diffusers is not importable ({err}); its rows are skipped")
        return None
    return embeddings


def bench_embedding(size: str, batches, d_emb, use_compile: bool, device: str) -> list[dict]:
    dim = EMB_DIMS[size]
    flip, shift = (True, 0.0) if size == "sd" else (False, 1.0)
    compiled = torch.compile(timestep_embedding_ref, dynamic=True) if use_compile else None
    rows = []
    for batch in batches:
        t = torch.randint(0, 1000, (batch,), device=device)
        impls = {
            "fusediff": lambda: K.timestep_embedding(t, dim, flip, shift),
            "fusediff ref": lambda: timestep_embedding_ref(t, dim, flip, shift),
        }
        if d_emb is not None:
            impls["diffusers eager"] = lambda: d_emb.get_timestep_embedding(t, dim, flip, shift)
        if compiled is not None:
            impls["torch.compile ref"] = lambda: compiled(t, dim, flip, shift)
        want = timestep_embedding_ref(t, dim, flip, shift)
        rows += with_speedups([dict(op="embedding", size=f"{size} dim {dim}", batch=batch, dtype="fp32", impl=name,
                                    **measure(fn, want)) for name, fn in impls.items()])
    return rows


def bench_mlp(size: str, dtype_name: str, batches, d_emb, use_compile: bool, device: str) -> list[dict]:
    dim, hidden, flip, shift = MLP_SIZES[size]
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    proj, mlp = Timesteps(dim, flip, shift), TimestepEmbedding(dim, hidden).to(device, dtype)
    w = (mlp.linear_1.weight, mlp.linear_1.bias, mlp.linear_2.weight, mlp.linear_2.bias)
    args = (dim, flip, shift, 1.0, 10000)
    kernels = sys.modules["fusediff.kernels.timestep_mlp"]._kernels()
    d_proj = d_mlp = compiled = None
    if d_emb is not None:
        d_proj, d_mlp = d_emb.Timesteps(dim, flip, shift), d_emb.TimestepEmbedding(dim, hidden).to(device, dtype)
        d_mlp.load_state_dict(mlp.state_dict())
        if use_compile:
            compiled = torch.compile(lambda t: d_mlp(d_proj(t).to(dtype)), dynamic=True)
    rows = []
    for batch in batches:
        t = torch.randint(0, 1000, (batch,), device=device)
        plans = {"fusediff timestep_mlp": kernels.choose_plan(batch, dim, w[0]), "fusediff plan one": "one",
                 "fusediff plan two": "two"}
        impls = {
            "fusediff timestep_mlp": lambda: K.timestep_mlp(t, *args, *w),
            "fusediff plan one": lambda: kernels.launch(t, *args, *w, plan="one"),
            "fusediff plan two": lambda: kernels.launch(t, *args, *w, plan="two"),
            "fusediff modules": lambda: mlp(proj(t).to(dtype)),
        }
        if d_mlp is not None:
            impls["diffusers eager"] = lambda: d_mlp(d_proj(t).to(dtype))
        if compiled is not None:
            impls["diffusers torch.compile"] = lambda: compiled(t)
        want = timestep_mlp_ref(t, *args, *(p.double() for p in w))
        rows += with_speedups([dict(op="time_mlp", size=size, batch=batch, dtype=dtype_name, impl=name,
                                    plan=plans.get(name, ""), **measure(fn, want)) for name, fn in impls.items()])
    return rows


def run(quick: bool, device: str = "cuda") -> list[dict]:
    d_emb = diffusers_embeddings()
    batches = BATCHES[:2] if quick else BATCHES
    rows = []
    for size in EMB_DIMS:
        rows += bench_embedding(size, batches, d_emb, not quick, device)
    for size in MLP_SIZES:
        for dtype_name in (["fp16"] if quick else list(DTYPES)):
            rows += bench_mlp(size, dtype_name, batches, d_emb, not quick, device)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="directory for the CSV file (default bench/results)")
    ap.add_argument("--quick", action="store_true", help="fp16, batches 2 and 16, no torch.compile rows")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_timestep_embedding.py needs a CUDA device")
    rows = run(args.quick)
    path = harness.append_rows("timestep_embedding.csv", [{c: r.get(c, "") for c in COLUMNS} for r in rows],
                               args.out)
    harness.print_table(rows, COLUMNS)
    print(f"gpu_us: do_bench with L2 cleared; wall_us: eager loop of {LOOP} calls + sync, per call; "
          f"speedups against diffusers eager; rows appended to {path}")


if __name__ == "__main__":
    main()
