"""The one list of fusediff's schedulers: each class, the module that defines it, and its command-line names.

Adding a scheduler means its module, its test and one entry of :data:`SCHEDULERS`; the rest is derived:
the lazy exports of :mod:`fusediff.schedulers` and :mod:`fusediff` (:func:`exports`), the classes whose
configs each scheduler reads (:func:`compatibles_of`, the ``_compatibles`` of every scheduler class) and
the ``--scheduler`` names of ``fusediff sample`` (:func:`cli_schedulers`).

This module imports nothing but the standard library, so ``import fusediff`` reads it without loading
a scheduler. Limits: every compatible scheduler listed steps the same discrete alpha-bar table, so each
one reads every other's config (diffusers' KarrasDiffusionSchedulers, less the ones fusediff does not
have); ``UnCLIPScheduler`` is registered with ``compatible=False``, as diffusers gives it no compatibles.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple


class Scheduler(NamedTuple):
    """One registered scheduler."""

    class_name: str  # the class, as exported from fusediff and fusediff.schedulers
    module: str  # the submodule of fusediff.schedulers that defines it
    cli: Mapping[str, Mapping[str, Any]]  # `fusediff sample --scheduler` name -> config overrides
    compatible: bool = True  # reads (and is read by) every other compatible scheduler's config


SCHEDULERS: tuple[Scheduler, ...] = (
    Scheduler("DDIMScheduler", "scheduling_ddim", {"ddim": {}}),
    Scheduler("DDPMScheduler", "scheduling_ddpm", {"ddpm": {}}),
    Scheduler("PNDMScheduler", "scheduling_pndm", {"pndm": {"skip_prk_steps": True}}),
    Scheduler("EulerDiscreteScheduler", "scheduling_euler_discrete", {"euler": {}}),
    Scheduler("EulerAncestralDiscreteScheduler", "scheduling_euler_ancestral_discrete", {"euler_a": {}}),
    Scheduler("HeunDiscreteScheduler", "scheduling_heun_discrete", {"heun": {}}),
    Scheduler("LMSDiscreteScheduler", "scheduling_lms_discrete", {"lms": {}}),
    Scheduler("DPMSolverMultistepScheduler", "scheduling_dpmsolver_multistep",
              {"dpmpp_2m": {}, "dpmpp_2m_karras": {"use_karras_sigmas": True}}),
    Scheduler("DEISMultistepScheduler", "scheduling_deis_multistep", {"deis": {}}),
    Scheduler("UniPCMultistepScheduler", "scheduling_unipc_multistep", {"unipc": {}}),
    # unCLIP's own DDPM variant: no command-line name, and, as in diffusers, no compatible classes
    Scheduler("UnCLIPScheduler", "scheduling_unclip", {}, compatible=False),
)
# public names of fusediff.schedulers that are no scheduler -> defining submodule
BASE_EXPORTS = {"SchedulerMixin": "scheduling_base", "SchedulerOutput": "scheduling_base"}


def exports() -> dict[str, str]:
    """Public name -> the submodule of :mod:`fusediff.schedulers` that defines it: base classes, then schedulers."""
    return {**BASE_EXPORTS, **{s.class_name: s.module for s in SCHEDULERS}}


def compatibles_of(class_name: str) -> tuple[str, ...]:
    """The scheduler class names whose configs ``class_name`` reads as its own: every other compatible one
    (none for a scheduler registered with ``compatible=False``)."""
    if not all(s.compatible for s in SCHEDULERS if s.class_name == class_name):
        return ()
    return tuple(s.class_name for s in SCHEDULERS if s.class_name != class_name and s.compatible)


def cli_schedulers() -> dict[str, tuple[str, dict[str, Any]]]:
    """``fusediff sample --scheduler`` name -> (class name, config overrides), in registry order."""
    return {name: (s.class_name, dict(overrides)) for s in SCHEDULERS for name, overrides in s.cli.items()}
