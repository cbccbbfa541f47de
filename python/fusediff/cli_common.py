"""What the two paths of ``fusediff sample`` share (:mod:`fusediff.cli` and :mod:`fusediff.cli_class`):
the ``--scheduler`` names and their classes, the default number of steps, which pipelines take a prompt,
and putting the chosen scheduler into a loaded pipeline.

The scheduler names come from :mod:`fusediff.schedulers.registry`. Nothing here imports torch or a
pipeline until a function runs, so building the parser stays cheap. Limits: a scheduler is swapped by
``from_config`` on the pipeline's scheduler config, so it inherits that config's betas and spacing.
"""

from __future__ import annotations

from typing import Any

from .schedulers.registry import cli_schedulers
from .utils.cli_types import CliError

# --scheduler of text-to-image and class-conditional pipelines: name -> (fusediff class, config overrides)
TEXT_SCHEDULERS = cli_schedulers()
DEFAULT_STEPS = 50
DDPM_STEPS = 1000  # DDPM samples every trained timestep by default


def default_steps(scheduler: str | None) -> int:
    """``--steps`` when it is not given: 1000 for ddpm, 50 for every other sampler (and the model's own)."""
    return DDPM_STEPS if scheduler == "ddpm" else DEFAULT_STEPS


def is_text_pipeline(pipe: Any) -> bool:
    """Whether ``pipe`` is a text-to-image pipeline (Stable Diffusion, LDM, DeepFloyd IF stage I, GLIDE's base), which
    takes ``--prompt``."""
    from .pipelines.pipeline_glide import GlidePipeline
    from .pipelines.pipeline_if import IFBase
    from .pipelines.pipeline_if_superresolution import IFSuperResolutionPipeline
    from .pipelines.pipeline_latent_diffusion import LDMTextToImagePipeline
    from .pipelines.pipeline_stable_diffusion import StableDiffusionBase

    if isinstance(pipe, IFSuperResolutionPipeline):
        return False
    return isinstance(pipe, (StableDiffusionBase, LDMTextToImagePipeline, IFBase, GlidePipeline))


def use_scheduler(pipe: Any, name: str | None) -> None:
    """Give ``pipe`` the ``--scheduler`` ``name`` (a key of :data:`TEXT_SCHEDULERS`), built from its
    scheduler's config with the name's overrides; None keeps the pipeline's own."""
    if name is None:
        return
    import fusediff

    class_name, overrides = TEXT_SCHEDULERS[name]
    try:
        scheduler_cls = getattr(fusediff, class_name)
    except (AttributeError, ImportError) as e:
        raise CliError(f"--scheduler {name}: {class_name} is not available ({e})") from None
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **overrides)
