"""ClassConditionalPipeline: images of requested classes from a class-conditional UNet2DModel, with
classifier-free guidance (Ho & Salimans 2022).

    y = requested labels (B,), y0 = the null class (trained by replacing y with y0 at random)
    x_T ~ N(0, I) * init_noise_sigma                                   (B, C, H, W)
    eps_c, eps_u = unet([x_t; x_t], t, [y; y0]).chunk(2)                one batched call, conditional half first
    eps = eps_u + s (eps_c - eps_u)                                     eq. 6 of the paper, with s = 1 + w
    x_{t-1} = scheduler.step(eps, t, x_t)
    image = (x_0 + 1) / 2

With s = 1 the loop makes one conditional call per step and never uses the null class; s = 0 is
unconditional sampling. The UNet is a ``UNet2DModel`` with a class-embedding table
(``num_class_embeds``); its null class is ``null_class_label`` (a pipeline setting saved in
``model_index.json``, default -1: the table's last row, as fusediff's trainer lays it out; None for a
model trained without one, which then samples with s = 1 only). The requested labels are the other rows.

The loop is :func:`fusediff.sampling.denoise`, as in the other pipelines, with noise drawn as
diffusers' pipelines draw it (one generator, or one per image) and an optional
``callback_on_step_end``. Any fusediff scheduler works; a
``DDPMScheduler`` (the training scheduler a directory usually holds) is converted to a
``DDIMScheduler`` on construction, so a loaded model samples with DDIM; assign ``pipe.scheduler``
afterwards to sample with another one.

Limits: diffusers has no such pipeline, so a saved directory loads in diffusers component by
component (``UNet2DModel``, the scheduler), not as a whole. Only table class embeddings
(``num_class_embeds``) are supported, not ``class_embed_type="timestep"`` or ``"identity"``.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..models import UNet2DModel
from ..schedulers import DDIMScheduler, DDPMScheduler, SchedulerMixin
from ..sampling import Guidance, check_steps, denoise, initial_noise, module_memory_format
from ..utils.torch_utils import Generator, to_device
from .pipeline_utils import (DiffusionPipeline, ImagePipelineOutput, check_callback_tensor_inputs, check_output_type,
                             postprocess_images, unet_prediction)

# Default guidance scale of a pipeline built for a model with a null class without naming one: plain
# conditional sampling. (The shipped digits model draws the requested class best that way: 0.99 of 256
# samples at 1.0, 0.90 at 2.0, 0.43 at 3.0; guidance pushes its small images into saturation.)
DEFAULT_GUIDANCE_SCALE = 1.0
ClassLabels = int | Sequence[int] | torch.Tensor


class ClassConditionalPipeline(DiffusionPipeline):
    """Class-conditional image generation with classifier-free guidance.

    Args:
        unet: a ``UNet2DModel`` built with ``num_class_embeds`` (diffusers' or fusediff's).
        scheduler: any fusediff scheduler; a ``DDPMScheduler`` becomes a ``DDIMScheduler`` of its config.
        null_class_label: the class-embedding row of the unconditional ("null") class: an index into
            the table, negative ones counting from its end (default -1, the last row), or None if the
            model has none (then only ``guidance_scale=1`` is possible).
        guidance_scale: the default guidance scale of calls, saved in model_index.json (None: 1.0,
            DEFAULT_GUIDANCE_SCALE).
    """

    _config_arguments = ("null_class_label", "guidance_scale")
    _callback_tensor_inputs: tuple[str, ...] = ("latents",)

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin, null_class_label: int | None = -1,
                 guidance_scale: float | None = None) -> None:
        super().__init__()
        num_classes = _num_class_embeds(unet)
        if null_class_label is not None:
            if isinstance(null_class_label, bool) or not isinstance(null_class_label, numbers.Integral) \
                    or not -num_classes <= null_class_label < num_classes:
                raise ValueError(f"null_class_label must be None or an int in [{-num_classes}, {num_classes}) "
                                 f"for a UNet with num_class_embeds={num_classes}; got {null_class_label!r}")
            null_class_label = int(null_class_label)
        if guidance_scale is None:
            guidance_scale = DEFAULT_GUIDANCE_SCALE if null_class_label is not None else 1.0
        guidance_scale = _checked_scale(guidance_scale)
        if null_class_label is None and guidance_scale != 1.0:
            raise ValueError(f"guidance_scale={guidance_scale} needs a null class; this pipeline has "
                             "null_class_label=None, so only 1.0 (plain conditional sampling) is possible")
        if type(scheduler) is DDPMScheduler:  # the training scheduler: sample with DDIM
            scheduler = DDIMScheduler.from_config(scheduler.config)
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(null_class_label=null_class_label, guidance_scale=guidance_scale)

    # -- classes -------------------------------------------------------------------------------
    @property
    def null_class(self) -> int | None:
        """The table row of the null class (a non-negative index), or None if the model has none."""
        label = self.config.null_class_label
        return None if label is None else label % _num_class_embeds(self.unet)

    @property
    def class_ids(self) -> list[int]:
        """The labels a call may request: every row of the class-embedding table but the null class."""
        return [c for c in range(_num_class_embeds(self.unet)) if c != self.null_class]

    @property
    def default_guidance_scale(self) -> float:
        """The guidance scale of a call that names none (the config's ``guidance_scale``)."""
        return float(self.config.guidance_scale)

    def check_class_labels(self, class_labels: ClassLabels) -> list[int]:
        """The requested labels as a list of ints; TypeError or ValueError naming ``class_labels`` otherwise.

        A tensor is read on the host once, before the loop."""
        if isinstance(class_labels, torch.Tensor):
            if class_labels.dim() > 1 or class_labels.is_floating_point() or class_labels.is_complex() \
                    or class_labels.dtype == torch.bool:
                raise TypeError(f"class_labels must be an int, a list of ints or a 1-d integer tensor; got a "
                                f"{class_labels.dtype} tensor of shape {tuple(class_labels.shape)}")
            labels = class_labels.reshape(-1).tolist()
        elif isinstance(class_labels, (numbers.Integral, Sequence)) and not isinstance(class_labels, (bool, str)):
            labels = [class_labels] if isinstance(class_labels, numbers.Integral) else list(class_labels)
            bad = [c for c in labels if isinstance(c, bool) or not isinstance(c, numbers.Integral)]
            if bad:
                raise TypeError(f"class_labels must be ints; got {bad[0]!r} ({type(bad[0]).__name__})")
            labels = [int(c) for c in labels]
        else:
            raise TypeError(f"class_labels must be an int, a list of ints or a 1-d integer tensor; "
                            f"got {type(class_labels).__name__}")
        if not labels:
            raise ValueError("class_labels is empty; pass at least one class")
        allowed = set(self.class_ids)
        wrong = sorted({c for c in labels if c not in allowed})
        if wrong:
            null = "" if self.null_class is None else f"; {self.null_class} is the null (unconditional) class"
            raise ValueError(f"class_labels {wrong} are out of range: this model's classes are "
                             f"{_ranges(self.class_ids)}{null}")
        return labels

    # -- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, class_labels: ClassLabels, guidance_scale: float | None = None,
                 num_inference_steps: int = 50, generator: Generator = None, eta: float = 0.0,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                 callback_on_step_end: Callable[..., dict[str, Any] | None] | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)) -> ImagePipelineOutput | tuple:
        """Draw one image per entry of ``class_labels``.

        Args:
            class_labels: an int or a list of ints (or a 1-d integer tensor): the class of each image.
            guidance_scale: s of eps_u + s (eps_c - eps_u); 1 is plain conditional sampling (one UNet
                call per step), other values make one batched call on [cond; null] (default: the
                pipeline's :attr:`default_guidance_scale`).
            num_inference_steps: denoising steps; eta: DDIM's noise weight (for schedulers that take it).
            generator: one torch.Generator, or one per image; latents: x_T (B, C, H, W) to start from.
            output_type: "pil", "np" or "pt"; return_dict: an :class:`ImagePipelineOutput` or a tuple.
            callback_on_step_end: called as ``f(pipe, i, t, {"latents": x})`` after each step; may
                return replacement latents.
        """
        labels = self.check_class_labels(class_labels)
        scale = self.default_guidance_scale if guidance_scale is None else _checked_scale(guidance_scale)
        guided = scale != 1.0
        if guided and self.null_class is None:
            raise ValueError(f"guidance_scale={scale} needs a null class, which this model has not "
                             "(null_class_label=None); use guidance_scale=1.0")
        check_output_type(output_type)
        check_steps(num_inference_steps)
        check_callback_tensor_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        batch, device, dtype = len(labels), self.device, self.unet.dtype
        # 1. the labels of the model call, [y; y0] under guidance, copied to the device once
        model_labels = labels + [self.null_class] * batch if guided else labels
        model_labels = to_device(torch.tensor(model_labels, dtype=torch.long), device)
        # 2. x_T ~ N(0, I) as diffusers draws it, 3. x_{t-1} = step(guided eps(x_t, t, y), t, x_t)
        size = self.unet.config.sample_size
        spatial = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch, self.unet.config.in_channels, *spatial)
        noise = initial_noise(shape, generator, device, dtype, latents).to(dtype)
        x = denoise(self.scheduler, functools.partial(unet_prediction, self.unet), noise,
                    num_inference_steps=num_inference_steps, model_kwargs={"class_labels": model_labels},
                    guidance=Guidance(scale, uncond_first=False) if guided else None, generator=generator, eta=eta,
                    callback_on_step_end=callback_on_step_end,
                    callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, pipeline=self,
                    progress=self.progress_bar, cuda_graph=self.model_call_graphs("unet step", self.unet),
                    memory_format=module_memory_format(self.unet))
        images = postprocess_images(x, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def _num_class_embeds(unet: Any) -> int:
    """The UNet's number of class-embedding rows; ValueError for a UNet without a class-embedding table."""
    config = getattr(unet, "config", None)
    if config is None:
        raise TypeError(f"unet must be a UNet2DModel with num_class_embeds; got {type(unet).__name__}")
    count = config.get("num_class_embeds")
    kind = config.get("class_embed_type")
    if count is None or kind is not None:
        what = f"class_embed_type={kind!r}" if kind is not None else "no class embedding (num_class_embeds=None)"
        raise ValueError(f"ClassConditionalPipeline needs a UNet with a class-embedding table (num_class_embeds "
                         f"set, class_embed_type None); this {type(unet).__name__} has {what}")
    return int(count)


def _checked_scale(guidance_scale: Any) -> float:
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) \
            or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number; got {guidance_scale!r}")
    return float(guidance_scale)


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts: list[str] = []
    start = prev = None
    for v in values + [None]:
        if start is not None and v is not None and v == prev + 1:
            prev = v
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = v
    return ", ".join(parts) if parts else "none"
