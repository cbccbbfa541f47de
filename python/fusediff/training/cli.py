"""``fusediff train``: train a small UNet2DModel on the bundled handwritten digits and write a pipeline.

    fusediff train --out DIR [--conditional [--cfg-drop-prob P]] [--steps N] [--batch N] [--grad-accum K]
                   [--lr LR] [--mixed-precision no|fp16|bf16] [--ema-decay D] [--sample-every N]
                   [--checkpoint-every N] [--resume [latest|DIR]] [--seed S] [--device cpu|cuda]
                   [--prediction-type epsilon|sample|v_prediction] [--snr-gamma G]
                   [--model-config digits|tiny] [--compile | --cuda-graph] [--channels-last] [--quiet]
    torchrun --nproc_per_node 2 -m fusediff.training.cli --out DIR ...       (data parallel)

The model learns the denoising objective of DDPM (Ho et al. 2020, alg. 1) on scikit-learn's 8x8
digits upscaled to 16x16 (:mod:`fusediff.training.digits`) under a squared-cosine schedule of 1000
steps; ``--conditional`` makes it class-conditional with classifier-free guidance (label 10 is the
null class, dropped in with ``--cfg-drop-prob``; Ho & Salimans 2022). DIR receives the pipeline
with the EMA weights (model_index.json, unet/, scheduler/), and ``samples/``, ``checkpoints/`` and
``log.jsonl`` as asked. ``python/fusediff/cli.py`` wires this in as a subcommand through
:func:`add_arguments` and :func:`run`; :func:`main` is the same as a stand-alone command.
Limits: the digits data only; the presets are small UNets for 16x16 gray images.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..utils.cli_types import (CliError, OneLineParser, non_negative_int, positive_float, positive_int, probability,
                               unit_interval)

NUM_CLASSES = 10
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)
# UNet presets; "digits" is scripts/train_digits.py's UNET_CONFIG (the shipped model), "tiny" is for tests
MODEL_CONFIGS = {
    "digits": dict(in_channels=1, out_channels=1, layers_per_block=2, block_out_channels=(32, 64, 64),
                   down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                   norm_num_groups=8, attention_head_dim=32),
    "tiny": dict(in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups=4, attention_head_dim=8),
}
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``fusediff train`` to ``parser``."""
    import torch

    from .trainer import TrainConfig

    d = TrainConfig()
    parser.add_argument("--out", type=Path, required=True,
                        help="output directory: the pipeline, samples/, checkpoints/")
    parser.add_argument("--conditional", action="store_true",
                        help="class-conditional model with classifier-free guidance")
    parser.add_argument("--cfg-drop-prob", type=probability, default=None,
                        help="with --conditional: probability of training on the null label (default 0.1)")
    parser.add_argument("--steps", type=positive_int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    parser.add_argument("--batch", type=positive_int, default=d.batch_size,
                        help=f"global batch size over all processes and micro-steps (default {d.batch_size})")
    parser.add_argument("--grad-accum", type=positive_int, default=d.grad_accum,
                        help="micro-steps per optimizer step (default 1)")
    parser.add_argument("--lr", type=positive_float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    parser.add_argument("--warmup", type=non_negative_int, default=d.warmup,
                        help=f"learning-rate warm-up steps (default {d.warmup})")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=d.mixed_precision,
                        help="autocast dtype of the forward (default no: fp32)")
    parser.add_argument("--ema-decay", type=unit_interval, default=d.ema_decay, help=f"EMA decay (default {d.ema_decay})")
    parser.add_argument("--ema-warmup", action="store_true", help="EMA decay warm-up (1 - (1 + step) ** -2/3)")
    parser.add_argument("--sample-every", type=non_negative_int, default=0,
                        help="write a sample grid to OUT/samples every N steps and at the end (default 0: never)")
    parser.add_argument("--checkpoint-every", type=non_negative_int, default=0,
                        help="write a checkpoint every N steps and at the end (default 0: never)")
    parser.add_argument("--keep-checkpoints", type=non_negative_int, default=d.keep_checkpoints,
                        help=f"newest checkpoints kept, 0 for all (default {d.keep_checkpoints})")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="latest|DIR",
                        help="continue from OUT's latest checkpoint, or from a checkpoint directory")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help="seed of the weights, data order and noise (default 0)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device (default cuda when available); under torchrun cuda:LOCAL_RANK")
    parser.add_argument("--prediction-type", choices=PREDICTION_TYPES, default="epsilon",
                        help="what the model predicts (default epsilon)")
    parser.add_argument("--snr-gamma", type=positive_float, default=None,
                        help="min-SNR-gamma loss weighting with this gamma (default: plain MSE)")
    parser.add_argument("--model-config", choices=tuple(MODEL_CONFIGS), default="digits",
                        help="UNet preset (default digits: the shipped model's)")
    parser.add_argument("--image-size", type=positive_int, default=16, help="side of the digit images (default 16)")
    parser.add_argument("--log-every", type=positive_int, default=d.log_every,
                        help=f"steps between log lines (default {d.log_every})")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay each optimizer step from one CUDA graph (CUDA, one process, not with fp16)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC UNet and inputs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no messages")
    parser.add_argument("--dist-timeout", type=positive_float, default=1800.0, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    """The stand-alone parser of ``python -m fusediff.training.cli`` (one-line errors)."""
    parser = OneLineParser(prog="fusediff train", description="train a diffusion model on the bundled digits")
    add_arguments(parser)
    return parser


def _check(args: argparse.Namespace) -> None:
    if args.cfg_drop_prob is not None and not args.conditional:
        raise CliError("--cfg-drop-prob needs --conditional", status=2)
    if args.batch % args.grad_accum:
        raise CliError(f"--batch {args.batch} must be divisible by --grad-accum {args.grad_accum}", status=2)
    if args.out.exists() and not args.out.is_dir():
        raise CliError(f"--out {str(args.out)!r} exists and is not a directory")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CliError("--device cuda: no CUDA device is available (use --device cpu)")
    if args.cuda_graph and args.device != "cuda":
        raise CliError("--cuda-graph needs --device cuda", status=2)
    if args.resume is not None:
        from .checkpoint import resolve_checkpoint

        try:
            resolve_checkpoint(args.out, args.resume)
        except FileNotFoundError as e:
            raise CliError(f"--resume: {e}") from None


def build_sampler(args: argparse.Namespace):
    """The UNet (seeded with ``--seed``) and the Sampler that trains it, on the CPU."""
    import torch

    from ..models import UNet2DModel
    from ..schedulers import DDPMScheduler
    from .adapters import ClassConditioning, ClassifierFreeGuidance, UNetAdapter
    from .predictor import Predictor
    from .sampler import Sampler
    from .schedule import Schedule

    config = dict(MODEL_CONFIGS[args.model_config], sample_size=args.image_size)
    if args.conditional:
        config["num_class_embeds"] = NUM_CLASSES + 1  # label NUM_CLASSES is the null class of guidance
    torch.manual_seed(args.seed)
    unet = UNet2DModel(**config)
    if args.conditional:
        drop = 0.1 if args.cfg_drop_prob is None else args.cfg_drop_prob
        model = ClassifierFreeGuidance(ClassConditioning(unet, num_classes=NUM_CLASSES), drop_prob=drop,
                                       null_cond={"class_labels": NUM_CLASSES})
    else:
        model = UNetAdapter(unet)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG, prediction_type=args.prediction_type)
    sampler = Sampler(model, Predictor(args.prediction_type), Schedule.from_scheduler(scheduler),
                      loss_weighting="min_snr" if args.snr_gamma is not None else None,
                      snr_gamma=args.snr_gamma if args.snr_gamma is not None else 5.0)
    return unet, sampler, scheduler


def run(args: argparse.Namespace) -> int:
    """Run ``fusediff train`` with parsed ``args``; returns the exit status (errors: one line on stderr)."""
    try:
        return _run(args)
    except CliError as e:
        print(f"fusediff train: error: {e}", file=sys.stderr)
        return e.status


def _run(args: argparse.Namespace) -> int:
    from . import distributed as D
    from .digits import DigitsDataset
    from .trainer import Trainer, TrainConfig

    _check(args)
    try:
        data = DigitsDataset(size=args.image_size, with_labels=args.conditional)
    except ImportError as e:
        raise CliError(str(e)) from None
    config = TrainConfig(steps=args.steps, batch_size=args.batch, grad_accum=args.grad_accum, lr=args.lr,
                         warmup=args.warmup, mixed_precision=args.mixed_precision, ema_decay=args.ema_decay,
                         ema_warmup=args.ema_warmup, sample_every=args.sample_every,
                         checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                         seed=args.seed, log_every=args.log_every, compile=args.compile,
                         channels_last=args.channels_last, cuda_graph=args.cuda_graph)
    try:
        config.validate(int(os.environ.get("WORLD_SIZE") or 1))
    except ValueError as e:
        raise CliError(str(e), status=2) from None
    with D.distributed(args.device, timeout_s=args.dist_timeout) as info:
        unet, sampler, scheduler = build_sampler(args)
        trainer = Trainer(sampler.to(info.device), data, config, args.out, unet=unet, scheduler=scheduler,
                          dist=info, progress=not args.quiet)
        if args.resume is not None:
            try:
                where = trainer.resume(args.resume)
            except (ValueError, FileNotFoundError) as e:
                raise CliError(f"--resume: {e}") from None
            if info.is_main and not args.quiet:
                print(f"resumed from {where} at step {trainer.step}")
        trainer.train()
        if info.is_main and not args.quiet:
            print(f"wrote the pipeline to {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m fusediff.training.cli``); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except CliError as e:
        print(f"fusediff train: error: {e}", file=sys.stderr)
        return e.status
    try:
        return run(args)
    except KeyboardInterrupt:
        print("fusediff train: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    sys.exit(main())
