"""Host cost per step of the sampling loop: fusediff's pipelines (eager and CUDA graphs) against HF
diffusers' pipelines, a hand-written loop over the same scheduler, and (``--old-tree``) an earlier
fusediff tree, all in one run on one GPU.

The UNet is a stand-in (:class:`NullUNet`: the real model's config, one elementwise kernel per call), so
what is timed is the loop itself: timesteps, guidance batching and combination, ``scale_model_input``,
``scheduler.step``, callbacks and progress bookkeeping. Per-step cost = (T(110 steps) - T(10 steps)) / 100,
T the fastest wall time of a whole pipeline call ending in a device synchronisation; the fixed cost
(noise, text embeddings given, no decoding: ``output_type="latent"``) cancels. The device work of a
step is a few microseconds, so every figure here is host time; the hand loop is the floor a user's
own loop reaches with the same scheduler.

Rows go to bench/results/sampling_loop.csv (or --out DIR).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace


def _use_tree(tree: str) -> None:
    """Import fusediff from ``tree`` (a folder holding fusediff/) instead of the installed package."""
    sys.meta_path[:] = [f for f in sys.meta_path
                        if "editable" not in type(f).__name__.lower() and "editable" not in type(f).__module__.lower()]
    sys.path[:] = [p for p in sys.path if "__editable__" not in p]
    sys.path.insert(0, str(Path(tree).resolve()))


if __name__ == "__main__" and "--tree" in sys.argv:
    _use_tree(sys.argv[sys.argv.index("--tree") + 1])

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
SCHEDULERS = ("DDIMScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler")
STEPS = (10, 110)  # per-step cost = the difference over 100 steps
DEVICE = "cuda"  # --device cpu: a smoke run of the script, not a measurement


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class NullUNet(torch.nn.Module):
    """A UNet's stand-in: ``config`` of the real model, one parameter (dtype, device, layout) and a forward
    that is one elementwise kernel, returned as diffusers' UNets return it."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.config = unet.config
        first = next(unet.parameters())
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=first.dtype, device=first.device), requires_grad=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, sample, timestep, *args, return_dict: bool = True, **kwargs):
        out = sample * 0.5
        return SimpleNamespace(sample=out) if return_dict else (out,)


def min_ms(fn, repeat: int) -> float:
    """The fastest of ``repeat`` synchronised calls: host cost with the least interference from other work."""
    fn()
    _sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def per_step(call, repeat: int) -> tuple[float, float]:
    """(µs per step, fixed ms) of ``call(num_inference_steps)``."""
    t_lo, t_hi = (min_ms(lambda n=n: call(n), repeat) for n in STEPS)
    step_ms = (t_hi - t_lo) / (STEPS[1] - STEPS[0])
    return step_ms * 1e3, t_lo - STEPS[0] * step_ms


def sd_pipeline(library, directory: Path, scheduler: str, dtype: torch.dtype):
    """library's StableDiffusionPipeline from ``directory`` on the GPU with a NullUNet and ``scheduler``."""
    pipe = library.StableDiffusionPipeline.from_pretrained(directory).to(DEVICE, dtype)
    pipe.unet = NullUNet(pipe.unet)
    pipe.scheduler = getattr(library, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_call(pipe, embeds, guidance_scale: float):
    positive, negative = embeds
    return lambda n: pipe(prompt_embeds=positive, negative_prompt_embeds=negative, guidance_scale=guidance_scale,
                          num_inference_steps=n, height=256, width=256, output_type="latent",
                          generator=torch.Generator(DEVICE).manual_seed(0))


def ddim_call(library, unet, dtype):
    pipe = library.DDIMPipeline(unet=NullUNet(unet), scheduler=library.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return lambda n: pipe(batch_size=1, num_inference_steps=n, output_type="np",
                          generator=torch.Generator(DEVICE).manual_seed(0))


def hand_loop(pipe, embeds, guidance_scale: float):
    """The loop a user writes over the same scheduler and stand-in UNet: CFG as one batched call."""
    positive, negative = embeds
    context = torch.cat([negative, positive])
    shape = (1, pipe.unet.config.in_channels, 256 // pipe.vae_scale_factor, 256 // pipe.vae_scale_factor)

    def call(n):
        scheduler = pipe.scheduler
        scheduler.set_timesteps(n, device=DEVICE)
        x = torch.randn(shape, generator=torch.Generator(DEVICE).manual_seed(0), device=DEVICE, dtype=positive.dtype)
        x = x * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([x, x]), t)
            eps_u, eps_c = pipe.unet(inp, t, encoder_hidden_states=context).sample.chunk(2)
            x = scheduler.step(eps_u + guidance_scale * (eps_c - eps_u), t, x).prev_sample
        return x
    return call


def fusediff_rows(label: str, directory: Path, dtype: torch.dtype, repeat: int, graphs: bool) -> list[dict]:
    import fusediff

    rows = []
    embeds = _embeds(directory, dtype)
    for scheduler in SCHEDULERS:
        for scale in (1.0, 7.5):
            pipe = sd_pipeline(fusediff, directory, scheduler, dtype)
            rows.append(_row("sd", scheduler, scale, label, *per_step(sd_call(pipe, embeds, scale), repeat)))
            if graphs:
                pipe.enable_cuda_graph()
                rows.append(_row("sd", scheduler, scale, label + " cuda-graph",
                                 *per_step(sd_call(pipe, embeds, scale), repeat)))
    unet = fusediff.StableDiffusionPipeline.from_pretrained(directory).unet.to(DEVICE, dtype)
    rows.append(_row("ddim-unconditional", "DDIMScheduler", 1.0, label, *per_step(ddim_call(fusediff, unet, dtype), repeat)))
    return rows


def _embeds(directory: Path, dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    dim = json.loads((directory / "unet" / "config.json").read_text())["cross_attention_dim"]
    return tuple(torch.randn(1, 77, dim, generator=g).to(DEVICE, dtype) for _ in range(2))


def _row(pipeline, scheduler, scale, impl, us, fixed_ms) -> dict:
    return dict(op="sampling_loop", pipeline=pipeline, scheduler=scheduler, guidance=scale, impl=impl,
                us_per_step=round(us, 1), fixed_ms=round(fixed_ms, 3), note="")


def other_rows(directory: Path, dtype: torch.dtype, repeat: int) -> list[dict]:
    """diffusers' pipelines and the hand loop (over fusediff's scheduler) on the same stand-in UNet."""
    import diffusers

    import fusediff

    rows = []
    embeds = _embeds(directory, dtype)
    for scheduler in SCHEDULERS:
        for scale in (1.0, 7.5):
            pipe = sd_pipeline(diffusers, directory, scheduler, dtype)
            rows.append(_row("sd", scheduler, scale, "diffusers", *per_step(sd_call(pipe, embeds, scale), repeat)))
        ours = sd_pipeline(fusediff, directory, scheduler, dtype)
        rows.append(_row("sd", scheduler, 7.5, "hand loop", *per_step(hand_loop(ours, embeds, 7.5), repeat)))
    unet = diffusers.UNet2DConditionModel.from_pretrained(directory / "unet").to(DEVICE, dtype)
    rows.append(_row("ddim-unconditional", "DDIMScheduler", 1.0, "diffusers",
                     *per_step(ddim_call(diffusers, unet, dtype), repeat)))
    return rows


def old_tree_rows(tree: str, label: str, directory: Path, repeat: int) -> list[dict]:
    out = subprocess.run([sys.executable, __file__, "--tree", tree, "--label", label, "--directory", str(directory),
                          "--repeat", str(repeat), "--device", DEVICE, "--json"], capture_output=True, text=True)
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        return [dict(_row("", "", "", label, float("nan"), float("nan")), note=f"failed: rc {out.returncode}")]
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="directory of the CSV (default bench/results)")
    ap.add_argument("--repeat", type=int, default=7, help="timed calls per step count (the fastest is kept)")
    ap.add_argument("--old-tree", default=None, help="a folder holding an earlier fusediff/ package to compare")
    ap.add_argument("--old-label", default="fusediff (old tree)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    ap.add_argument("--label", help=argparse.SUPPRESS)
    ap.add_argument("--directory", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    if args.json:  # a child run over another tree: its fusediff rows as one JSON line
        import fusediff

        where = Path(fusediff.__file__).resolve()
        if not where.is_relative_to(Path(args.tree).resolve()):
            raise SystemExit(f"fusediff was imported from {where}, not from the tree {args.tree}")
        print(json.dumps(fusediff_rows(args.label, Path(args.directory), dtype, args.repeat, graphs=DEVICE == "cuda")))
        return
    sys.path.insert(0, str(HERE.parent / "tests" / "pipelines"))
    sys.path.insert(0, str(HERE))
    import harness
    import tiny_sd

    directory = Path(tempfile.mkdtemp()) / "sd"
    tiny_sd.build_sd(directory)
    rows = fusediff_rows("fusediff", directory, dtype, args.repeat, graphs=DEVICE == "cuda")
    rows += other_rows(directory, dtype, args.repeat)
    if args.old_tree:
        rows += old_tree_rows(args.old_tree, args.old_label, directory, args.repeat)
    gpu, commit = harness.device_name(), harness.git_commit()
    for row in rows:
        row.update(gpu=gpu, commit=commit, dtype=str(dtype)[6:])
    harness.append_rows("sampling_loop.csv", rows, args.out)
    rows.sort(key=lambda r: (r.get("pipeline", ""), r.get("scheduler", ""), r.get("guidance", 0), r["impl"]))
    harness.print_table(rows, ["pipeline", "scheduler", "guidance", "impl", "us_per_step", "fixed_ms"])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
