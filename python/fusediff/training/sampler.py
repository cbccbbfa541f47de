"""Sampler: the denoising diffusion objective in training mode, the sampling loop in evaluation mode.

Training (``sampler.train(); loss = sampler(batch)``), Ho et al. 2020, alg. 1:
    1. eps ~ N(0, I), then t ~ p(t) (diffusers' training scripts draw in this order), unless the batch
       already holds ``noise``/``timesteps``/``noisy`` (from the :class:`~fusediff.training.AddNoise` transform)
    2. x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    3. one model call m = model(x_t, t, **cond); target from the predictor (eps, x0 or v)
    4. per-item MSE in float32, optionally times the min-SNR-gamma weight (Hang et al. 2023), then the mean.
Evaluation (``sampler.eval(); x0 = sampler(batch)``): from x_T = ``batch["noise"]``, the pipelines' loop
(:func:`fusediff.sampling.denoise`) with a fusediff scheduler built from the schedule (DDIM, eta = 0, by
default: Song et al. 2021, eq. 12), i.e. what DDIMPipeline computes, returned in the data's scale (no
[-1, 1] -> [0, 1] mapping, no VAE decoding).

Limits: discrete-time objectives only; the loss is an unweighted or min-SNR-weighted MSE; evaluation runs
under ``torch.no_grad`` and is not meant to be compiled as a whole (compile the model instead).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..sampling import denoise
from ..utils.torch_utils import randn_tensor
from .losses import TIMESTEP_SAMPLINGS, min_snr_weights, sample_timesteps
from .predictor import Predictor
from .schedule import Schedule

# batch keys that are not conditions: the data and what the AddNoise transform adds
RESERVED_KEYS = ("sample", "noise", "timesteps", "noisy")
LOSS_WEIGHTINGS = (None, "min_snr")


class Sampler(nn.Module):
    """A model, its output's parameterisation and a noise schedule: the training loss and the sampler.

    Args:
        model: ``model(sample, timestep, **cond) -> tensor`` (an adapter from :mod:`fusediff.training.adapters`).
        predictor: the :class:`Predictor` of the model's output.
        schedule: the training :class:`Schedule`.
        loss_weighting: None (plain MSE) or ``"min_snr"`` (Hang et al. 2023, with ``snr_gamma``).
        snr_gamma: gamma of min-SNR weighting.
        timestep_sampling: ``"uniform"`` or ``"logit_normal"`` (:func:`sample_timesteps`).
        scheduler: the evaluation scheduler: a fusediff scheduler class built from the schedule (default
            DDIMScheduler), or an instance used as it is (its prediction type must be the predictor's).
        eta: DDIM's eta in evaluation (0: deterministic).
        cond_keys: the batch keys passed to the model; default every key but ``sample``, ``noise``,
            ``timesteps`` and ``noisy``.
    """

    def __init__(self, model: nn.Module, predictor: Predictor, schedule: Schedule, loss_weighting: str | None = None,
                 snr_gamma: float = 5.0, timestep_sampling: str = "uniform", scheduler: Any = None, eta: float = 0.0,
                 cond_keys: Sequence[str] | None = None) -> None:
        super().__init__()
        for name, value, cls in (("model", model, nn.Module), ("predictor", predictor, Predictor),
                                 ("schedule", schedule, Schedule)):
            if not isinstance(value, cls):
                raise TypeError(f"{name} must be a {cls.__name__}; got {type(value).__name__}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be None or 'min_snr'; got {loss_weighting!r}")
        if loss_weighting == "min_snr" and (isinstance(snr_gamma, bool) or not isinstance(snr_gamma, (int, float))
                                            or not snr_gamma > 0):
            raise ValueError(f"snr_gamma must be a positive number; got {snr_gamma!r}")
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLINGS)}; "
                             f"got {timestep_sampling!r}")
        if scheduler is not None and not isinstance(scheduler, type):
            kind = getattr(getattr(scheduler, "config", None), "prediction_type", predictor.prediction_type)
            if kind != predictor.prediction_type:
                raise ValueError(f"scheduler predicts {kind!r} but the predictor is {predictor.prediction_type!r}")
        self.model = model
        self.predictor = predictor
        self.schedule = schedule
        self.loss_weighting = loss_weighting
        self.snr_gamma = float(snr_gamma)
        self.timestep_sampling = timestep_sampling
        self.scheduler = scheduler
        self.eta = float(eta)
        self.cond_keys = tuple(cond_keys) if cond_keys is not None else None

    def extra_repr(self) -> str:
        return (f"loss_weighting={self.loss_weighting!r}, snr_gamma={self.snr_gamma}, "
                f"timestep_sampling={self.timestep_sampling!r}")

    def condition(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The model's condition keywords in ``batch``."""
        if self.cond_keys is not None:
            return {k: batch[k] for k in self.cond_keys if k in batch}
        return {k: v for k, v in batch.items() if k not in RESERVED_KEYS}

    def _call_model(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any],
                    generator: torch.Generator | None) -> torch.Tensor:
        if generator is not None and getattr(self.model, "uses_generator", False):
            return self.model(x, t, generator=generator, **cond)
        return self.model(x, t, **cond)

    def forward(self, batch: Mapping[str, Any], generator: torch.Generator | None = None,
                num_inference_steps: int = 50) -> torch.Tensor:
        """Training mode: the scalar float32 loss of ``batch``. Evaluation mode: samples from
        ``batch["noise"]`` in ``num_inference_steps`` steps (:meth:`generate`)."""
        if self.training:
            return self.loss(batch, generator)
        return self.generate(batch, generator, num_inference_steps)

    # -- training ------------------------------------------------------------------------------
    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """The denoising loss of ``batch`` (one model call), a float32 scalar."""
        if not isinstance(batch, Mapping) or not isinstance(batch.get("sample"), torch.Tensor):
            raise ValueError("batch must be a dict holding the tensor 'sample' (x0)")
        x0 = batch["sample"]
        noise, t, x_t = batch.get("noise"), batch.get("timesteps"), batch.get("noisy")
        if x_t is not None and (noise is None or t is None):
            raise ValueError("a batch with 'noisy' must also hold the 'noise' and 'timesteps' it was made with")
        # 1. eps and t, unless given
        if noise is None:
            noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if t is None:
            t = sample_timesteps(x0.shape[0], self.schedule.num_timesteps, x0.device, generator,
                                 kind=self.timestep_sampling)
        # 2. x_t
        if x_t is None:
            x_t = self.schedule.add_noise(x0, noise, t)
        # 3. one model call, and the target it regresses
        out = self._call_model(x_t, t, self.condition(batch), generator)
        target = self.predictor.target(x0, noise, t, self.schedule)
        if out.shape != target.shape:
            raise ValueError(f"the model output has shape {tuple(out.shape)}; the target {tuple(target.shape)}")
        # 4. per-item MSE in float32, weighted, averaged
        per_item = F.mse_loss(out.float(), target.float(), reduction="none").mean(dim=tuple(range(1, out.dim())))
        if self.loss_weighting == "min_snr":
            per_item = per_item * min_snr_weights(self.schedule.snr(t), self.snr_gamma, self.predictor.prediction_type)
        return per_item.mean()

    # -- evaluation ----------------------------------------------------------------------------
    def make_scheduler(self) -> Any:
        """The evaluation scheduler: the given instance, or one of the given class (DDIMScheduler by default)
        built from the schedule with the predictor's prediction type."""
        if self.scheduler is not None and not isinstance(self.scheduler, type):
            return self.scheduler
        return self.schedule.to_scheduler(self.scheduler, prediction_type=self.predictor.prediction_type)

    @torch.no_grad()
    def generate(self, batch: Mapping[str, Any], generator: torch.Generator | None = None,
                 num_inference_steps: int = 50) -> torch.Tensor:
        """Denoise ``batch["noise"]`` (x_T, (B, C, H, W)) with the batch's condition keys; the modules run
        in evaluation mode (restored after). ``generator`` seeds a stochastic scheduler's noise."""
        if not isinstance(batch, Mapping) or not isinstance(batch.get("noise"), torch.Tensor):
            raise ValueError("sampling needs a batch dict holding 'noise' (x_T)")
        scheduler = self.make_scheduler()
        was_training = self.training
        self.eval()
        try:
            return self._loop(scheduler, batch["noise"], self.condition(batch), generator, num_inference_steps)
        finally:
            self.train(was_training)

    def _loop(self, scheduler: Any, noise: torch.Tensor, cond: dict[str, Any], generator: torch.Generator | None,
              num_inference_steps: int) -> torch.Tensor:
        """x_T = noise * init_noise_sigma, then x_{t'} = step(model(x_t, t), t, x_t): :func:`fusediff.sampling.denoise`."""
        return denoise(scheduler, self.model, noise, num_inference_steps=num_inference_steps, model_kwargs=cond,
                       generator=generator, eta=self.eta, progress=False)

    def sample(self, batch_size: int, shape: Sequence[int], generator: torch.Generator | None = None,
               num_inference_steps: int = 50, **cond: Any) -> torch.Tensor:
        """Draw x_T of (batch_size, *shape) as DDIMPipeline draws it (in the model's dtype, on its device) and
        denoise it (:meth:`generate`) with the condition keywords ``cond``."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        first = next(self.model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        dtype = first.dtype if first is not None else torch.float32
        noise = randn_tensor((batch_size, *shape), generator=generator, device=device, dtype=dtype)
        return self.generate({"noise": noise, **cond}, generator, num_inference_steps)
