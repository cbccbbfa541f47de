"""TrainConfig, every setting of a training run, and lr_at, the learning-rate schedule.

The defaults are the settings of the digits model shipped in ``fusediff/assets/digits``
(``scripts/train_digits.py``): AdamW at 2e-3 with 200 warm-up steps and a cosine decay to 2% of
the peak (Loshchilov & Hutter 2017, SGDR's cosine without restarts), gradient clipping at norm 1 and
an EMA of the weights. Limits: one parameter group (one learning rate and weight decay for all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MIXED_PRECISION = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
LR_SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig:
    """Every setting of a training run; the defaults are those of the shipped digits model's script."""

    steps: int = 2500  # optimizer steps in all
    batch_size: int = 1024  # global batch: items per optimizer step over all ranks and micro-steps
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 2e-3  # peak learning rate of AdamW
    warmup: int = 200  # steps of linear learning-rate warm-up from lr / warmup
    lr_schedule: str = "cosine"  # "cosine" (decay to min_lr_ratio * lr at the end) or "constant" (after warm-up)
    min_lr_ratio: float = 0.02  # floor of the cosine decay, a fraction of lr
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's moment decays
    clip_grad_norm: float | None = 1.0  # max global gradient norm; None: no clipping
    mixed_precision: str = "no"  # "no" (fp32), "fp16" (autocast + GradScaler) or "bf16" (autocast)
    ema_decay: float = 0.998  # the EMA's decay ceiling
    ema_warmup: bool = False  # EMAModel's use_ema_warmup: decay 1 - (1 + step / inv_gamma) ** -power
    ema_inv_gamma: float = 1.0  # of the EMA warm-up
    ema_power: float = 2 / 3  # of the EMA warm-up
    ema_update_after_step: int = 0  # the EMA copies the weights until this step
    sample_every: int = 0  # write a sample grid every this many steps (and at the end); 0: never
    num_samples: int = 16  # images in a sample grid
    sample_steps: int = 50  # DDIM steps of a sample grid
    checkpoint_every: int = 0  # write a checkpoint every this many steps (and at the end); 0: never
    keep_checkpoints: int | None = 3  # newest checkpoints kept; None or 0: all
    seed: int = 0  # seeds the data order, the noise generator and the per-rank global RNG
    log_every: int = 50  # steps between loss / lr / images-per-second updates
    compile: bool = False  # torch.compile the training forward
    channels_last: bool = False  # the UNet and its inputs in NHWC
    cuda_graph: bool = False  # replay each optimizer step (all micro-steps) from one CUDA graph (CUDAGraphTrainStep)

    def validate(self, world_size: int = 1) -> None:
        """Raise ValueError naming the first bad setting."""
        for name in ("steps", "batch_size", "grad_accum", "num_samples", "sample_steps", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup", "sample_every", "checkpoint_every", "ema_update_after_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.batch_size % (self.grad_accum * world_size):
            raise ValueError(f"batch_size {self.batch_size} must be divisible by grad_accum x world_size "
                             f"= {self.grad_accum} x {world_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be positive or None, got {self.clip_grad_norm!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {tuple(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        if not 0 <= self.ema_decay <= 1:
            raise ValueError(f"ema_decay must lie in [0, 1], got {self.ema_decay!r}")
        if self.cuda_graph:
            if self.mixed_precision == "fp16":
                raise ValueError("cuda_graph does not run with mixed_precision='fp16' (the GradScaler's inf check "
                                 "reads the device every step); use 'bf16' or 'no'")
            if self.compile:
                raise ValueError("cuda_graph and compile are exclusive: choose one")
            if world_size > 1:
                raise ValueError(f"cuda_graph does not run under DistributedDataParallel (world size {world_size}); "
                                 "train on one process or without cuda_graph")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 0:
            raise ValueError(f"keep_checkpoints must be >= 0 or None, got {self.keep_checkpoints!r}")


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine decay or constant."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.lr_schedule == "constant":
        return config.lr
    progress = (step - config.warmup) / max(config.steps - config.warmup, 1)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
