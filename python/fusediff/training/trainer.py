"""The training loop: AdamW on a Sampler's loss, with accumulation, mixed precision, EMA, grids, checkpoints, DDP.

One optimizer step takes ``batch_size`` items (the global batch) in ``grad_accum`` micro-steps; on
each of ``world_size`` ranks a micro-step is ``batch_size / (grad_accum * world_size)`` items. The
loss of a micro-step is divided by ``grad_accum`` and back-propagated (under DDP's ``no_sync`` but
for the last micro-step, whose backward all-reduces the mean gradient), then the gradients are
clipped, AdamW steps at the learning rate of :func:`lr_at` (linear warm-up, cosine decay to
``min_lr_ratio`` of the peak, as ``scripts/train_digits.py``) and the EMA of the weights is updated
(:class:`fusediff.training.EMAModel`, diffusers' semantics). Mixed precision is
``torch.autocast`` around the forward (bf16 or fp16; fp16 with a GradScaler).

Data order is exact and resumable: epoch e is ``torch.randperm(N)`` drawn from a generator seeded
with ``seed + e``; a step takes the next ``batch_size`` positions of the stream of epochs (crossing
epoch ends) and rank r takes its slice of each micro-step. (epoch, index) is saved with the
optimizer, GradScaler and EMA state and every rank's RNG states, so that a resumed run continues bit
for bit (:mod:`fusediff.training.checkpoint`). The noise and timesteps come from a per-rank
generator handed to the Sampler; anything else random (classifier-free guidance's label drop) uses
torch's global RNG, seeded per rank.

With ``cuda_graph`` an optimizer step (every micro-step, the clipping and a fused capturable AdamW
whose learning rate is a device tensor) is replayed from one CUDA graph
(:class:`~fusediff.training.CUDAGraphTrainStep`, recorded at the first step and again after
``resume``); the batches, noise draws and losses are those of the eager step, and the EMA update runs
after each replay. It needs one CUDA process, bf16 or fp32 (not fp16's GradScaler) and no ``compile``.

Limits: the data are indexed in memory (:class:`~fusediff.training.digits.TensorDataset`); all trained
parameters must belong to one UNet (the one saved); ``compile`` compiles the training forward only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..pipeline_directory import model_index, save_pipeline_directory
from . import distributed as D
from .checkpoint import STATE_FILE, load_state, resolve_checkpoint, save_checkpoint, save_state
from .config import MIXED_PRECISION, TrainConfig, lr_at
from .digits import TensorDataset

__all__ = ["Trainer", "TrainConfig", "lr_at", "save_image_grid"]


def _find_unet(sampler: nn.Module) -> nn.Module:
    from ..modeling import ModelMixin

    for module in sampler.modules():
        if isinstance(module, ModelMixin):
            return module
    raise ValueError("the sampler holds no fusediff model (ModelMixin) to save; pass unet= to the Trainer")


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, pad: int = 2) -> None:
    """Write (B, C, H, W) images in [-1, 1] as one near-square grid PNG, atomically."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, 1 or 3, H, W); got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = torch.zeros(c, rows * (h + pad) + pad, cols * (w + pad) + pad, dtype=torch.uint8)
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    for i in range(b):
        y, x = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        grid[:, y:y + h, x:x + w] = pixels[i]
    array = grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[..., 0] if c == 1 else array)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


class Trainer:
    """Trains ``sampler`` (a :class:`~fusediff.training.Sampler`, whose train-mode forward returns the loss).

    Args:
        sampler: the Sampler (model adapter + predictor + schedule), already on its device.
        data: a TensorDataset, a dict of equally long tensors (``"sample"``, optional ``"class_labels"``) or
            a tensor of samples.
        config: the :class:`TrainConfig`.
        out_dir: where ``samples/``, ``checkpoints/``, ``log.jsonl`` and the final pipeline go.
        sample_fn: ``sample_fn(sampler, generator) -> (B, C, H, W)`` images in [-1, 1] for the grids
            (called in eval mode with the EMA weights in place); default ``sampler.sample``.
        unet: the model whose weights are saved (default: the first fusediff model inside ``sampler``).
        scheduler: the sampling scheduler saved with the final pipeline (default: a DDPMScheduler over the
            sampler's schedule, with its prediction type).
        pipeline_cls: class of the final pipeline (default: a directory naming ClassConditionalPipeline when
            the UNet has class embeddings, else DDPMPipeline; see :meth:`save_pipeline`).
        dist: the :class:`~fusediff.training.distributed.DistInfo` of this process (default: the current
            process group, on the sampler's device).
        progress: show a tqdm bar on rank 0.
    """

    def __init__(self, sampler: nn.Module, data: Any, config: TrainConfig, out_dir: str | os.PathLike,
                 sample_fn: Callable[[nn.Module, torch.Generator], torch.Tensor] | None = None, *,
                 unet: nn.Module | None = None, scheduler: Any = None, pipeline_cls: type | None = None,
                 dist: D.DistInfo | None = None, progress: bool = True, find_unused_parameters: bool = False) -> None:
        from .ema import EMAModel

        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.sampler, self.config, self.out_dir = sampler, config, Path(out_dir)
        params = [p for p in sampler.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the sampler has no trainable parameters")
        self.device = params[0].device
        self.dist = dist or self._current_dist(self.device)
        config.validate(self.dist.world_size)
        self.data = TensorDataset.wrap(data)
        if "sample" not in self.data.tensors:
            raise ValueError(f"data must hold a 'sample' tensor; got {sorted(self.data.tensors)}")
        self.unet = unet if unet is not None else _find_unet(sampler)
        owned = {id(p) for p in self.unet.parameters()}
        if any(id(p) not in owned for p in params):
            raise ValueError("every trained parameter must belong to the saved UNet")
        if config.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.params = params
        self.sample_fn, self.progress = sample_fn, progress
        self.scheduler, self.pipeline_cls = scheduler, pipeline_cls
        if config.cuda_graph:
            if self.device.type != "cuda":
                raise ValueError(f"cuda_graph needs the model on a CUDA device; it is on {self.device}")
            # the rate lives in a device tensor the graph reads (train_step fills it); the step count too
            self.optimizer = torch.optim.AdamW(params, lr=torch.tensor(config.lr, device=self.device),
                                               betas=config.betas, weight_decay=config.weight_decay,
                                               fused=True, capturable=True)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas,
                                               weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.mixed_precision == "fp16")
        self.ema = EMAModel(params, decay=config.ema_decay, min_decay=0.0,
                            update_after_step=config.ema_update_after_step, use_ema_warmup=config.ema_warmup,
                            inv_gamma=config.ema_inv_gamma, power=config.ema_power)
        self.ddp = D.wrap_ddp(sampler, self.dist, find_unused_parameters)
        self._forward = torch.compile(self.ddp) if config.compile else self.ddp
        rank_seed = config.seed * 1_000_003 + self.dist.rank
        torch.manual_seed(rank_seed)  # the global RNG of every device, distinct per rank
        self.generator = torch.Generator(self.device).manual_seed(rank_seed + 500_009)
        self.step, self.epoch, self.index = 0, 0, 0
        self.history: list[tuple[int, float]] = []  # (step, mean loss of that step) at each log point
        self._perm_epoch, self._perm = -1, None
        self._graph_step: Any = None  # the CUDAGraphTrainStep of config.cuda_graph, built at the first step
        self._graph_keys: tuple[str, ...] = ()

    @staticmethod
    def _current_dist(device: torch.device) -> D.DistInfo:
        now = D.current()
        return D.DistInfo(now.rank, now.world_size, now.local_rank, device)

    # -- data order -------------------------------------------------------------------------------------
    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.config.seed + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.data), generator=g), epoch
        return self._perm

    def _take(self, n: int) -> torch.Tensor:
        """The next ``n`` item indices of the epoch stream; advances (epoch, index)."""
        parts, size = [], len(self.data)
        while n > 0:
            k = min(n, size - self.index)
            parts.append(self._permutation(self.epoch)[self.index:self.index + k])
            self.index, n = self.index + k, n - k
            if self.index == size:
                self.epoch, self.index = self.epoch + 1, 0
        return torch.cat(parts)

    def _batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in self.data[indices.to(self._data_device)].items()}
        if self.config.channels_last and batch["sample"].dim() == 4:
            batch["sample"] = batch["sample"].contiguous(memory_format=torch.channels_last)
        return batch

    @property
    def _data_device(self) -> torch.device:
        return self.data.tensors["sample"].device

    # -- one optimizer step -----------------------------------------------------------------------------
    def train_step(self) -> torch.Tensor:
        """One optimizer step over the next global batch; returns this rank's mean loss (a 0-d tensor)."""
        if self.config.cuda_graph:
            return self._graph_train_step()
        cfg, dist = self.config, self.dist
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        per_rank = cfg.batch_size // (cfg.grad_accum * dist.world_size)
        indices = self._take(cfg.batch_size).view(cfg.grad_accum, dist.world_size, per_rank)
        dtype = MIXED_PRECISION[cfg.mixed_precision]
        total = torch.zeros((), device=self.device)
        self.sampler.train()
        for micro in range(cfg.grad_accum):
            batch = self._batch(indices[micro, dist.rank])
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or not dist.enabled else self.ddp.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss = self._forward(batch, generator=self.generator)
                self.scaler.scale(loss.float() / cfg.grad_accum).backward()
            total += loss.detach().float()
        self.scaler.unscale_(self.optimizer)
        if cfg.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.params)
        self.step += 1
        return total / cfg.grad_accum

    def _graph_loss(self, *tensors: torch.Tensor) -> torch.Tensor:
        """The loss of one micro-batch as the graph records it (autocast without its weight cache)."""
        dtype = MIXED_PRECISION[self.config.mixed_precision]
        batch = dict(zip(self._graph_keys, tensors))
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None,
                            cache_enabled=False):
            loss = self._forward(batch, generator=self.generator)
        return loss.float()

    def _graph_train_step(self) -> torch.Tensor:
        """train_step replayed from a CUDA graph: the same micro-batches, losses, clipping, AdamW and EMA steps."""
        from .graph_step import CUDAGraphTrainStep

        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr_at(self.step, cfg))
        # the micro-batches one after the other along dim 0: CUDAGraphTrainStep cuts them apart again
        batch = self._batch(self._take(cfg.batch_size))
        if self._graph_step is None:
            self._graph_keys = tuple(sorted(batch))
            self._graph_step = CUDAGraphTrainStep(self._graph_loss, self.optimizer, clip_grad_norm=cfg.clip_grad_norm,
                                                  grad_accum=cfg.grad_accum, generators=(self.generator,))
        self.sampler.train()
        loss = self._graph_step(*(batch[k] for k in self._graph_keys)).clone()
        self.ema.step(self.params)
        self.step += 1
        return loss

    # -- the loop ---------------------------------------------------------------------------------------
    def train(self, until: int | None = None) -> None:
        """Train up to step ``until`` (default ``config.steps``); at ``config.steps`` write the final pipeline.

        Sample grids and checkpoints are written every ``sample_every`` / ``checkpoint_every`` steps and
        at the last step of the run.
        """
        cfg = self.config
        until = cfg.steps if until is None else until
        if not self.step <= until <= cfg.steps:
            raise ValueError(f"until must lie in [{self.step}, {cfg.steps}], got {until}")
        bar = None
        if self.dist.is_main and self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="training", dynamic_ncols=True)
        tick, tick_step = time.perf_counter(), self.step
        try:
            while self.step < until:
                loss = self.train_step()
                if self.step % cfg.log_every == 0 or self.step == until:
                    tick, tick_step = self._log(loss, bar, tick, tick_step)
                if bar is not None:
                    bar.update(1)
                final = self.step == until
                if cfg.sample_every and (self.step % cfg.sample_every == 0 or final):
                    self.write_samples()
                if cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or final):
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        if self.step == cfg.steps:
            self.save_pipeline()

    def _log(self, loss: torch.Tensor, bar: Any, tick: float, tick_step: int) -> tuple[float, int]:
        value = float(loss)
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {self.step}")
        now = time.perf_counter()
        rate = (self.step - tick_step) * self.config.batch_size / max(now - tick, 1e-9)
        lr = float(self.optimizer.param_groups[0]["lr"])  # a device tensor under cuda_graph
        self.history.append((self.step, value))
        if self.dist.is_main:
            if bar is not None:
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.step, "loss": value, "lr": lr, "images_per_s": rate}) + "\n")
        return now, self.step

    # -- EMA weights, samples, pipeline ---------------------------------------------------------------------
    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Within the block the trained parameters hold the EMA weights; the raw ones come back after."""
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def sample(self) -> torch.Tensor:
        """``num_samples`` images in [-1, 1] from the EMA weights in eval mode, with a fixed seed."""
        cfg = self.config
        generator = torch.Generator(self.device).manual_seed(cfg.seed)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.ema_weights(), torch.no_grad():
            self.sampler.eval()
            try:
                if self.sample_fn is not None:
                    return self.sample_fn(self.sampler, generator)
                cond: dict[str, Any] = {}
                if "class_labels" in self.data.tensors:
                    num_classes = int(self.data.tensors["class_labels"].max()) + 1
                    cond["class_labels"] = torch.arange(cfg.num_samples, device=self.device) % num_classes
                shape = tuple(self.data.tensors["sample"].shape[1:])
                return self.sampler.sample(cfg.num_samples, shape=shape, generator=generator,
                                           num_inference_steps=cfg.sample_steps, **cond)
            finally:
                self.sampler.train()

    def write_samples(self) -> Path | None:
        """Write ``out_dir/samples/step_XXXXXX.png`` (rank 0 only); returns its path there."""
        if not self.dist.is_main:
            return None
        path = self.out_dir / "samples" / f"step_{self.step:06d}.png"
        save_image_grid(self.sample(), path)
        return path

    def _scheduler(self) -> Any:
        """The scheduler saved with the pipeline: the given one, or a DDPMScheduler over the sampler's schedule."""
        if self.scheduler is not None:
            return self.scheduler
        from ..schedulers import DDPMScheduler

        predictor = getattr(self.sampler, "predictor", None)
        overrides = {"prediction_type": predictor.prediction_type} if predictor is not None else {}
        return self.sampler.schedule.to_scheduler(DDPMScheduler, **overrides)

    def save_pipeline(self, path: str | os.PathLike | None = None) -> Path:
        """Write the pipeline with the EMA weights to ``path`` (default ``out_dir``) atomically, on rank 0.

        Without ``pipeline_cls`` the directory names ``ClassConditionalPipeline`` for a UNet with class
        embeddings (which loads it with its default null class and guidance, sampling with DDIM) and
        ``DDPMPipeline`` otherwise, with the UNet and the scheduler as components."""
        path = Path(path) if path is not None else self.out_dir
        if self.dist.is_main:
            with self.ema_weights():
                components = {"unet": self.unet, "scheduler": self._scheduler()}
                if self.pipeline_cls is not None:
                    self.pipeline_cls(**components).save_pretrained(path)
                else:
                    conditional = bool(getattr(self.unet.config, "num_class_embeds", None))
                    name = "ClassConditionalPipeline" if conditional else "DDPMPipeline"
                    save_pipeline_directory(path, model_index(name, components), components)
        self._dump_rank_weights()
        D.barrier()
        return path

    def _dump_rank_weights(self) -> None:
        """Test hook: with FUSEDIFF_TRAIN_DUMP_RANK_WEIGHTS=1 every rank writes out_dir/rank{r}.safetensors."""
        if os.environ.get("FUSEDIFF_TRAIN_DUMP_RANK_WEIGHTS") != "1":
            return
        from safetensors.torch import save_file

        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.unet.state_dict().items()}
        save_file(state, str(self.out_dir / f"rank{self.dist.rank}.safetensors"))

    # -- checkpoints ----------------------------------------------------------------------------------------
    def _rng_state(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state(), "generator": self.generator.get_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _set_rng_state(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["cpu"])
        self.generator.set_state(state["generator"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def state_dict(self, rng: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything but the weights that resuming needs (weights-only loadable)."""
        return {"format": 1, "step": self.step, "epoch": self.epoch, "index": self.index,
                "world_size": self.dist.world_size, "config": {k: (list(v) if isinstance(v, tuple) else v)
                                                               for k, v in asdict(self.config).items()},
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict(), "rng": rng if rng is not None else [self._rng_state()]}

    def save_checkpoint(self) -> Path:
        """Write ``out_dir/checkpoints/step_XXXXXX`` (rank 0; every rank hands over its RNG states)."""
        rng = D.all_gather_objects(self._rng_state())
        target = self.out_dir / "checkpoints"
        if self.dist.is_main:
            state = self.state_dict(rng)

            def write(tmp: Path) -> None:
                self.unet.save_pretrained(tmp / "unet")
                with self.ema_weights():
                    self.unet.save_pretrained(tmp / "unet_ema")
                save_state(tmp / STATE_FILE, state)

            target = save_checkpoint(self.out_dir, self.step, write, self.config.keep_checkpoints or None)
        D.barrier()
        return target

    def resume(self, spec: str | os.PathLike = "latest") -> Path:
        """Load the checkpoint ``spec`` ("latest" of ``out_dir``, or a checkpoint directory) into this trainer."""
        from safetensors.torch import load_file

        path = resolve_checkpoint(self.out_dir, spec)
        state = load_state(path / STATE_FILE)
        weights = load_file(str(path / "unet" / "diffusion_pytorch_model.safetensors"))
        self.unet.load_state_dict(weights, strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.config.cuda_graph:  # a rate saved as a float becomes the device tensor again; the graph is rebuilt
            for group in self.optimizer.param_groups:
                group["lr"] = torch.as_tensor(group["lr"], dtype=torch.float32, device=self.device).clone()
            self._graph_step = None
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.ema.load_state_dict(state["ema"])
        if hasattr(self.ema, "to"):
            self.ema.to(self.device)
        self.step, self.epoch, self.index = int(state["step"]), int(state["epoch"]), int(state["index"])
        if self.step > self.config.steps:
            raise ValueError(f"checkpoint {str(path)!r} is at step {self.step}, past steps={self.config.steps}")
        rng = state["rng"]
        if len(rng) == self.dist.world_size:
            self._set_rng_state(rng[self.dist.rank])
        else:
            warnings.warn(f"checkpoint written by {len(rng)} ranks, resumed on {self.dist.world_size}: "
                          "random numbers are reseeded, the run is not bit-identical", stacklevel=2)
            torch.manual_seed(self.config.seed * 1_000_003 + self.dist.rank + 7919 * self.step)
            self.generator.manual_seed(self.config.seed * 1_000_003 + self.dist.rank + 7919 * self.step + 1)
        return path
