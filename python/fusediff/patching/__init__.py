"""``fusediff.patch(obj)``: run fusediff's fused kernels inside a model or pipeline another library built.

``patch`` walks a ``torch.nn.Module`` (or every module among a pipeline's ``components``, as
diffusers' and fusediff's pipelines have them) and, per instance, swaps in:

- every ``torch.nn.GroupNorm`` (exactly that class): :func:`fusediff.kernels.group_norm`;
- diffusers' ``ResnetBlock2D`` with SiLU: a forward with GroupNorm + SiLU fused, twice per block;
- diffusers' ``Attention`` with one of its default processors: :class:`FusedAttnProcessor`
  (``attn.set_processor``), :func:`fusediff.kernels.attention` with any strides;
- diffusers' ``Timesteps``: :func:`fusediff.kernels.timestep_embedding`, one launch;
- diffusers' ``GEGLU``: :func:`fusediff.kernels.geglu`, one launch after the projection.

Classes are matched by name and module (``diffusers.*``), so diffusers is never imported here,
and each instance's attributes are checked: a module of those classes whose shape is not the one
the fused code relies on, or whose attention processor is not a diffusers default, is left
exactly as it is and named, with the reason, in a warning and in :func:`report`. Nothing is
monkeypatched on a class; modules keep their classes, parameters, state-dict names and hooks
(``forwards.py`` says how). A module that already has an instance-level ``forward`` (accelerate's
offload hooks) is skipped.

Not fused: the GroupNorm + SiLU pairs that sit in a parent's forward (``conv_norm_out`` then
``conv_act`` in the UNets and the VAE's encoder and decoder) run as a fused GroupNorm and torch's
SiLU, one extra launch per model call, which is what a clean patch of two sibling modules costs;
``TimestepEmbedding`` (Linear, SiLU, Linear on B rows) stays diffusers', since fusing it with the
sinusoid (:func:`fusediff.kernels.timestep_mlp`) would mean replacing the UNet's own forward.

``unpatch`` removes exactly what ``patch`` installed (the instance ``forward`` attributes, and the
original processor objects go back), leaving no attribute behind; outputs are then bit-identical
to before. Both are idempotent and return ``obj``; :func:`patched` is the context-manager form.
Numerically the patched model agrees with the original within the house tolerance rule (the fused
ops round once, in float32).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

from torch import nn

from .attention_processor import ATTENTION, FusedAttnProcessor
from .forwards import GEGLU, GROUP_NORM, RESNET, TIMESTEPS, Target

__all__ = ["FusedAttnProcessor", "PatchReport", "patch", "patched", "report", "unpatch"]

logger = logging.getLogger(__name__)
TARGETS: tuple[Target, ...] = (GROUP_NORM, RESNET, ATTENTION, TIMESTEPS, GEGLU)
T = TypeVar("T")


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch` does to an object, by module name (pipeline components prefix their names)."""

    patched: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> kind, patched now
    patchable: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> kind, patch() would patch
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> why patch() leaves it

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for kind in self.patched.values():
            counts[kind] = counts.get(kind, 0) + 1
        done = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "nothing"
        return f"patched {done}; {len(self.patchable)} patchable; {len(self.skipped)} skipped"


def _named_modules(obj: Any) -> list[tuple[str, nn.Module]]:
    """(name, module) for every module of ``obj``, each once; TypeError for anything else."""
    if isinstance(obj, nn.Module):
        return list(obj.named_modules())
    components = getattr(obj, "components", None)
    if not isinstance(components, Mapping):
        raise TypeError("fusediff.patch/unpatch: expected a torch.nn.Module or a pipeline with a `components` "
                        f"mapping; got {type(obj).__module__}.{type(obj).__qualname__}")
    seen: set[int] = set()
    modules = []
    for component_name, component in components.items():
        if isinstance(component, nn.Module):
            for name, module in component.named_modules(prefix=str(component_name)):
                if id(module) not in seen:
                    seen.add(id(module))
                    modules.append((name, module))
    return modules


def _plan(obj: Any) -> tuple[PatchReport, list[tuple[Target, nn.Module]]]:
    """The report of ``obj`` and the (target, module) pairs patch() would install."""
    result, todo = PatchReport(), []
    for name, module in _named_modules(obj):
        target = next((t for t in TARGETS if t.matches(module)), None)
        if target is None:
            continue
        if target.installed(module):
            result.patched[name] = target.kind
        elif "forward" in module.__dict__:
            result.skipped[name] = f"{target.kind}: has its own instance forward (a hook?)"
        elif (why := target.unsupported(module)) is not None:
            result.skipped[name] = f"{target.kind}: {why}"
        else:
            result.patchable[name] = target.kind
            todo.append((target, module))
    return result, todo


def report(obj: Any) -> PatchReport:
    """Which modules of ``obj`` are patched, which :func:`patch` would patch, and which it skips and why."""
    return _plan(obj)[0]


def patch(obj: T) -> T:
    """Swap fusediff's kernels into ``obj`` (a torch module or a pipeline) in place; returns ``obj``.

    Modules already patched are left as they are, so patching twice is patching once. Modules of a
    recognised class that cannot be patched are named in a UserWarning and in :func:`report`.
    """
    result, todo = _plan(obj)
    for target, module in todo:
        target.install(module)
    result.patched.update(result.patchable)
    result.patchable.clear()
    logger.info("fusediff.patch(%s): %s", type(obj).__name__, result.summary())
    if result.skipped:
        listed = "; ".join(f"{name}: {why}" for name, why in result.skipped.items())
        warnings.warn(f"fusediff.patch left {len(result.skipped)} module(s) as they are: {listed}", stacklevel=2)
    return obj


def _installed(obj: Any) -> list[tuple[Target, nn.Module]]:
    """The (target, module) pairs of ``obj`` that patch() has installed."""
    return [(target, module) for _, module in _named_modules(obj) for target in TARGETS if target.installed(module)]


def unpatch(obj: T) -> T:
    """Restore every module of ``obj`` that :func:`patch` changed; a no-op on one it did not. Returns ``obj``."""
    for target, module in _installed(obj):
        target.remove(module)
    return obj


@contextlib.contextmanager
def patched(obj: T) -> Iterator[T]:
    """``with fusediff.patching.patched(unet): ...`` patches ``obj`` for the block; modules that were
    patched before the block stay patched after it."""
    before = {id(module) for _, module in _installed(obj)}
    patch(obj)
    try:
        yield obj
    finally:
        for target, module in _installed(obj):
            if id(module) not in before:
                target.remove(module)
