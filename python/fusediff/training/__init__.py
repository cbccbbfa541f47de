"""fusediff.training: composable parts for training diffusion models, and the trainer built on them.

Parts (each an nn.Module with one job, or a small function):
- Schedule (the noise schedule's tables), Predictor (what the model's output means),
- adapters: UNetAdapter, ClassConditioning, TextConditioning, ClassifierFreeGuidance,
- Sampler (the training loss in train mode, the sampling loop in eval mode),
- dict-batch transforms: Normalize, RandomHorizontalFlip, RandomCrop, VAEEncode, AddNoise,
- EMAModel (diffusers' EMA semantics), and the loss helpers compute_snr, min_snr_weights, loss_target,
  sample_timesteps;
and the trainer: Trainer and TrainConfig (``fusediff train``), checkpoints, DDP through torchrun, the
bundled digits data, and CUDAGraphTrainStep (a whole training step replayed from one CUDA graph).

A training model is called as ``model(sample, timestep, **cond) -> tensor``; batches are dicts of tensors.
Layering (DESIGN.md): training imports models, schedulers, sampling (the sampling loop), kernels and utils,
never pipelines (the final pipeline directory is written by class name, :mod:`fusediff.pipeline_directory`);
pipelines never import training.
"""

from .adapters import ClassConditioning, ClassifierFreeGuidance, TextConditioning, UNetAdapter
from .ema import EMAModel
from .losses import compute_snr, loss_target, min_snr_weights, sample_timesteps
from .predictor import Predictor
from .sampler import Sampler
from .schedule import Schedule
from .transforms import AddNoise, Normalize, RandomCrop, RandomHorizontalFlip, VAEEncode

__all__ = [
    "Schedule", "Predictor", "Sampler", "UNetAdapter", "ClassConditioning", "TextConditioning",
    "ClassifierFreeGuidance", "EMAModel", "compute_snr", "min_snr_weights", "loss_target", "sample_timesteps",
    "Normalize", "RandomHorizontalFlip", "RandomCrop", "VAEEncode", "AddNoise",
]


# -- the trainer and its data ------------------------------------------------------------------
from .checkpoint import resolve_checkpoint  # noqa: E402
from .config import TrainConfig, lr_at  # noqa: E402
from .digits import DigitsDataset, TensorDataset, load_digits_images  # noqa: E402
from .graph_step import CUDAGraphTrainStep  # noqa: E402
from .trainer import Trainer  # noqa: E402

__all__ += ["Trainer", "TrainConfig", "lr_at", "resolve_checkpoint", "DigitsDataset", "TensorDataset",
            "load_digits_images", "CUDAGraphTrainStep"]
