"""Train the digits model that ships inside fusediff (``fusediff/assets/digits/``).

A small UNet2DModel learns DDPM's noise prediction (Ho et al. 2020, algorithm 1) on
scikit-learn's 8x8 handwritten digits upscaled to 16x16 (``digits_data.py``), with AdamW, a
cosine learning rate and an exponential moving average of the weights, which is what is
saved. The result is a DDPMPipeline directory (model_index.json, unet/, scheduler/).

    python scripts/train_digits.py --out python/fusediff/assets/digits --seed 0

The defaults are the settings of the shipped weights. Same seed, same device type and same
software give the same weights (deterministic algorithms are enforced); the shipped weights were
made on the GPU named in ``python/fusediff/assets/digits/TRAINING.md``, about 6 minutes there. At
the end the script samples 256 digits with 50 DDIM steps on the CPU and reports how many the
classifier of ``digits_data.py`` labels with confidence.

This script is kept as it is so that the shipped weights stay reproducible: its recipe (batches drawn
with replacement from one generator, a constant-decay EMA) is not the one of ``fusediff train``
(:mod:`fusediff.training`: seeded epoch permutations, diffusers' EMA schedule, checkpoints and resume,
data parallel). The same UNet, schedule and optimiser settings as a class-conditional model with
classifier-free guidance are trained with

    fusediff train --conditional --out DIR --seed 0          (or python -m fusediff.training.cli ...)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from digits_data import SIZE, confident_digits, fit_classifier, load_digits_images

UNET_CONFIG = dict(
    sample_size=SIZE, in_channels=1, out_channels=1, layers_per_block=2,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8, attention_head_dim=32,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="pipeline directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2500, help="optimizer steps")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema", type=float, default=0.998, help="EMA decay of the saved weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args()


def lr_at(step: int, total: int, peak: float, warmup: int = 200) -> float:
    """Linear warm-up, then cosine decay to 2% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args: argparse.Namespace):
    from fusediff import DDPMScheduler, UNet2DModel

    torch.manual_seed(args.seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    device = torch.device(args.device)
    images, _ = load_digits_images()
    images = images.to(device)
    model = UNet2DModel(**UNET_CONFIG).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator(device).manual_seed(args.seed)
    print(f"UNet2DModel with {model.num_parameters() / 1e6:.2f}M parameters on {device}")
    start = time.time()
    for step in range(args.steps):
        # 1. a batch of x0, timesteps t ~ U{0..T-1} and noise eps
        idx = torch.randint(0, images.shape[0], (args.batch,), device=device, generator=gen)
        x0 = images[idx]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), device=device, generator=gen)
        eps = torch.randn(x0.shape, device=device, generator=gen)
        # 2. x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; loss = |eps - eps_theta(x_t, t)|^2
        loss = F.mse_loss(model(scheduler.add_noise(x0, eps, t), t).sample, eps)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # 3. EMA of the weights (the saved model)
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - args.ema)
        if step % 500 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:.0f}s", flush=True)
    return ema.cpu(), scheduler


def evaluate(pipe, seed: int) -> dict:
    """Sample 256 digits with 50 DDIM steps on the CPU and classify them."""
    from fusediff import DDIMPipeline

    clf, accuracy, _ = fit_classifier()
    ddim = DDIMPipeline(unet=pipe.unet, scheduler=pipe.scheduler)
    ddim.set_progress_bar_config(disable=True)
    samples = ddim(batch_size=256, generator=torch.Generator().manual_seed(seed), output_type="pt").images
    labels, confident = confident_digits(clf, samples * 2 - 1)
    return {"classifier_holdout_accuracy": accuracy, "confident_fraction": float(confident.mean()),
            "digit_counts": {int(d): int((labels[confident] == d).sum()) for d in range(10)}}


def main() -> None:
    args = parse_args()
    from fusediff import DDPMPipeline

    unet, scheduler = train(args)
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.save_pretrained(args.out)
    report = evaluate(pipe, args.seed)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
