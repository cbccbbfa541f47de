"""``fusediff sample`` for class-conditional models: which pipelines count as one, the classes of
``--class`` and ``--batch``, and the sampling call (the rest of the command is :mod:`fusediff.cli`).

A class-conditional model is a ``ClassConditionalPipeline`` directory, or any UNet + scheduler
directory (a ``DDPMPipeline``'s, say) whose UNet has a class-embedding table; the latter samples with
the pipeline's defaults (null class = the table's last row, guidance 2). ``--class`` values are
repeated in order to fill ``--batch`` images (default 16 for one class, one image per class for
several); without ``--class`` the model's classes are drawn in turn. Limits: the scheduler names are
the text-to-image ones (:data:`fusediff.cli_common.TEXT_SCHEDULERS`); the guidance scale is one for all
images. This module imports :mod:`fusediff.cli_common` and :mod:`fusediff.utils.cli_types`, never
:mod:`fusediff.cli`.
"""

from __future__ import annotations

import argparse
from typing import Any

from .cli_common import default_steps, is_text_pipeline, use_scheduler
from .utils.cli_types import CliError


def as_class_conditional(loaded: Any) -> Any:
    """``loaded`` as a ClassConditionalPipeline if it is one, or holds a UNet with a class-embedding table
    (and is no text-to-image pipeline); None otherwise."""
    from .pipelines.pipeline_class_conditional import ClassConditionalPipeline

    if isinstance(loaded, ClassConditionalPipeline):
        return loaded
    unet, scheduler = getattr(loaded, "unet", None), getattr(loaded, "scheduler", None)
    config = getattr(unet, "config", None)
    if is_text_pipeline(loaded) or config is None or scheduler is None or config.get("num_class_embeds") is None \
            or config.get("class_embed_type") is not None:
        return None
    return ClassConditionalPipeline(unet=unet, scheduler=scheduler)


def requested_labels(args: argparse.Namespace, pipe: Any) -> list[int]:
    """One class per image: ``--class`` values repeated in order to fill ``--batch``, or all classes in turn."""
    given = [c for group in args.class_labels for c in group] if args.class_labels is not None else None
    if given is not None:
        try:
            pipe.check_class_labels(given)
        except (TypeError, ValueError) as e:
            raise CliError(f"argument --class: {e}", status=2) from None
    classes = given if given is not None else pipe.class_ids
    batch = args.batch or (len(given) if given is not None and len(given) > 1 else 16)
    if given is not None and batch < len(given):
        raise CliError(f"--batch {batch} is fewer images than the {len(given)} classes of --class", status=2)
    return [classes[i % len(classes)] for i in range(batch)]


def class_images(args: argparse.Namespace, pipe: Any) -> list:
    """Images of the requested classes from a class-conditional pipeline."""
    import torch

    labels = requested_labels(args, pipe)
    use_scheduler(pipe, args.scheduler)
    pipe = pipe.to(args.device)
    name = args.scheduler or type(pipe.scheduler).__name__.removesuffix("Scheduler").lower()
    pipe.set_progress_bar_config(disable=args.quiet, desc=f"{name} sampling")
    steps = args.steps or default_steps(args.scheduler)
    try:
        return pipe(labels, guidance_scale=args.guidance, num_inference_steps=steps,
                    generator=torch.Generator("cpu").manual_seed(args.seed)).images
    except ValueError as e:  # guidance without a null class, more steps than the scheduler was trained with
        raise CliError(str(e)) from None
