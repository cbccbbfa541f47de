"""Training throughput of the DDPM CIFAR-10 UNet2DModel: fusediff against HF diffusers, in one run.

One training step is what ``fusediff train`` and diffusers' train_unconditional.py do: draw
timesteps and noise, noise the batch (``add_noise``), one UNet forward under
``torch.autocast(bfloat16)`` (fp32 master weights; ``--precision bf16`` puts the weights in bf16
instead), MSE to the noise in fp32, backward, ``AdamW(fused=True)`` step. Batch 128 of 32x32x3
images, the google/ddpm-cifar10-32 configuration (35.7M parameters), random weights identical in
both libraries.

Rows (``--rows``):
  diffusers-eager        diffusers' UNet2DModel as its training script runs it: NCHW, eager (the baseline)
  diffusers-eager-cl     the same in channels-last
  diffusers-compile      ``torch.compile(model)`` (default mode), channels-last
  fusediff-eager         fusediff's UNet2DModel in channels-last, eager: fused GroupNorm+SiLU and attention,
                         forward and backward (Triton)
  fusediff-eager-nchw    the same model left in NCHW (contiguous)
  fusediff-ref           fusediff-eager with ``FUSEDIFF_KERNELS=ref`` (torch ops only): what the fused kernels add
  fusediff-compile       ``torch.compile(model, fullgraph=True)`` of fusediff's channels-last model
  fusediff-graph         fusediff-eager with the whole step (forward, backward, AdamW) replayed from one CUDA
                         graph (``fusediff.training.CUDAGraphTrainStep``; optimizer ``capturable=True``)
  diffusers-graph        diffusers' NCHW model through the same CUDA-graph step (the same technique, their model)
  fusediff-trainer       ``fusediff.training.Trainer.train_step`` (what ``fusediff train`` runs) on the same
                         channels-last model: more work than the rows above (data indexing on the GPU, per-step
                         learning rate, gradient clipping, the EMA update; the foreach AdamW), bf16 autocast
  fusediff-trainer-graph the same with ``TrainConfig(cuda_graph=True)`` (``fusediff train --cuda-graph``): the
                         optimizer step replayed from a CUDA graph, the EMA update eager after it

Method: ``ms`` is the median host wall clock of a step ending in a device synchronisation
(``--steps`` timed steps after ``--warmup``), so host overhead counts, as in training; ``gpu_ms`` is
the sum of the step's kernel times (torch.profiler), the device-only cost. images/s = batch / ms.
FLOPs of a step: torch.utils.flop_counter over diffusers' forward and backward (convolutions,
matmuls, attention); ``roofline`` is the achieved TFLOP/s over the bf16 matmul rate measured in the
same run. ``loss_rel_diff`` compares each row's first-step loss with diffusers eager's on the same
batch (a sanity check, not a test). Rows go to ``--out``/train.csv.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import append_rows, device_name, kernel_times_us, matmul_tflops, print_table, wall_ms  # noqa: E402

from fusediff.benchmarks.models import DDPM_CIFAR10_UNET, flops  # noqa: E402
from fusediff.utils.cli_types import positive_int  # noqa: E402

ROWS = ("diffusers-eager", "diffusers-eager-cl", "diffusers-compile", "diffusers-graph", "fusediff-eager",
        "fusediff-eager-nchw", "fusediff-ref", "fusediff-compile", "fusediff-graph", "fusediff-trainer",
        "fusediff-trainer-graph")
NUM_TRAIN_TIMESTEPS = 1000
TARGET_SPEEDUP = 1.5  # the training target: fusediff at least 1.5x diffusers eager


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--batch", type=positive_int, default=128)
    p.add_argument("--precision", choices=("autocast", "bf16"), default="autocast",
                   help="autocast: fp32 weights, bf16 compute (default); bf16: weights in bf16")
    p.add_argument("--steps", type=positive_int, default=20, help="timed steps per row")
    p.add_argument("--warmup", type=positive_int, default=5, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--out", type=Path, default=None, help="directory of train.csv (default bench/results)")
    return p.parse_args(argv)


def build(row: str, state: dict, args) -> torch.nn.Module:
    """The row's UNet with the shared random weights, on the GPU, in the row's layout and compile mode."""
    if row.startswith("diffusers"):
        from diffusers import UNet2DModel
    else:
        from fusediff import UNet2DModel
    model = UNet2DModel(**DDPM_CIFAR10_UNET)
    model.load_state_dict(state)
    model = model.cuda().train()
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
    if row not in ("diffusers-eager", "diffusers-graph", "fusediff-eager-nchw"):
        model = model.to(memory_format=torch.channels_last)
    if row.endswith("compile"):
        model = torch.compile(model, fullgraph=row.startswith("fusediff"))
    return model


def make_step(model, args, data, graph: bool):
    """A closure running one training step on ``data`` (x0, t, noise); returns the loss tensor."""
    from fusediff import DDPMScheduler
    from fusediff.training.graph_step import CUDAGraphTrainStep

    scheduler = DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS)
    if graph:  # the step count and the learning rate live on the device, so the graph can replay them
        opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-4, device="cuda"), fused=True, capturable=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x0, t, noise = data

    def loss_fn(x0, t, noise):
        noisy = scheduler.add_noise(x0, noise, t)
        # autocast's weight-cast cache must be off under graph capture (its casts are recorded per replay)
        with (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graph) if args.precision == "autocast"
              else contextlib.nullcontext()):
            pred = model(noisy, t).sample
        return F.mse_loss(pred.float(), noise.float())

    if graph:
        graphed = CUDAGraphTrainStep(loss_fn, opt)
        return lambda: graphed(x0, t, noise), loss_fn

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x0, t, noise)
        loss.backward()
        opt.step()
        return loss

    return step, loss_fn


def make_trainer_step(model, args, data, graph: bool, out_dir: Path):
    """``Trainer.train_step`` over a dataset of 8 batches of ``data``'s images; (step, loss_fn)."""
    from fusediff import DDPMScheduler
    from fusediff.training import Predictor, Sampler, Schedule, UNetAdapter
    from fusediff.training.trainer import Trainer, TrainConfig

    schedule = Schedule.from_scheduler(DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS))
    sampler = Sampler(UNetAdapter(model), Predictor("epsilon"), schedule).cuda()  # the schedule's tables too
    images = data[0].repeat(8, 1, 1, 1)
    cfg = TrainConfig(steps=10**6, batch_size=args.batch, lr=1e-4, warmup=0, mixed_precision="bf16",
                      channels_last=True, cuda_graph=graph, log_every=10**6)
    trainer = Trainer(sampler, {"sample": images}, cfg, out_dir, progress=False)

    def loss_fn(x0, t, noise):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return sampler({"sample": x0, "timesteps": t, "noise": noise})

    return trainer.train_step, loss_fn


def measure(row: str, state: dict, args, data, step_flops: float, peak: float) -> dict:
    import tempfile

    from fusediff import kernels

    backend = kernels.use_backend("ref") if row == "fusediff-ref" else contextlib.nullcontext()
    with backend, tempfile.TemporaryDirectory() as tmp:
        model = build(row, state, args)
        if row.startswith("fusediff-trainer"):
            step, loss_fn = make_trainer_step(model, args, data, row.endswith("graph"), Path(tmp))
        else:
            step, loss_fn = make_step(model, args, data, graph=row.endswith("graph"))
        if row.endswith("graph") or row.startswith("fusediff-trainer"):
            # the loss on the rows' shared batch (a trainer draws its own batch, timesteps and noise);
            # a graph step's first call records the graph (warm-up steps that leave no trace)
            with torch.no_grad():
                first_loss = float(loss_fn(*data))
            step()
        else:
            first_loss = float(step().detach())
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        ms = wall_ms(step, repeat=args.steps, warmup=args.warmup)
        gpu_ms = sum(kernel_times_us(step, reps=3).values()) / 1e3
    mem = torch.cuda.max_memory_allocated() / 2**30
    del model, step
    torch.cuda.empty_cache()
    return {"row": row, "precision": args.precision, "batch": args.batch, "ms": round(ms, 3),
            "gpu_ms": round(gpu_ms, 3), "images_per_s": round(args.batch / ms * 1e3, 1),
            "tflops": round(step_flops / ms / 1e9, 2), "roofline": round(step_flops / ms / 1e9 / peak, 3),
            "peak_gib": round(mem, 2), "first_loss": first_loss}


def step_flops(state: dict, args, data) -> float:
    """FLOPs of one forward and backward of the UNet (diffusers' eager model; the same arithmetic)."""
    from diffusers import UNet2DModel

    model = UNet2DModel(**DDPM_CIFAR10_UNET)
    model.load_state_dict(state)
    model = model.cuda().train()
    x0, t, noise = data

    def fwd_bwd():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x0, t).sample
        F.mse_loss(out.float(), noise).backward()

    return flops(fwd_bwd)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_train.py needs a CUDA GPU")
    torch.manual_seed(0)
    from diffusers import UNet2DModel

    state = copy.deepcopy(UNet2DModel(**DDPM_CIFAR10_UNET).state_dict())
    g = torch.Generator("cuda").manual_seed(0)
    x0 = torch.rand(args.batch, 3, 32, 32, device="cuda", generator=g) * 2 - 1
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (args.batch,), device="cuda", generator=g)
    noise = torch.randn(x0.shape, device="cuda", generator=g)
    data = (x0, t, noise)
    total_flops = step_flops(state, args, data)
    peak = matmul_tflops()
    print(f"{device_name()}: bf16 matmul {peak:.0f} TFLOP/s; step {total_flops / 1e9:.0f} GFLOP "
          f"(forward + backward), batch {args.batch}, {args.precision}")
    rows = []
    for row in args.rows:
        try:
            rows.append(measure(row, state, args, data, total_flops, peak))
        except Exception as e:  # a failing row is recorded and the run goes on
            rows.append({"row": row, "precision": args.precision, "batch": args.batch,
                         "note": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"})
        print(rows[-1], flush=True)
    base = next((r for r in rows if r["row"] == "diffusers-eager" and "ms" in r), None)
    for r in rows:
        if base is not None and "ms" in r:
            r["speedup"] = round(base["ms"] / r["ms"], 2)
            r["loss_rel_diff"] = f"{abs(r['first_loss'] - base['first_loss']) / abs(base['first_loss']):.1e}"
    print_table(rows, ["row", "ms", "gpu_ms", "images_per_s", "speedup", "tflops", "roofline", "peak_gib",
                       "loss_rel_diff", "note"])
    ours = next((r for r in rows if r["row"] == "fusediff-eager" and "speedup" in r), None)
    if ours is not None:
        verdict = "met" if ours["speedup"] >= TARGET_SPEEDUP else "missed"
        print(f"target: fusediff eager >= {TARGET_SPEEDUP}x diffusers eager: {ours['speedup']}x ({verdict})")
    print("wrote", append_rows("train.csv", rows, args.out))


if __name__ == "__main__":
    main()
