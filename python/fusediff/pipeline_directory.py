"""Writing a pipeline directory in diffusers' layout: ``model_index.json`` and one subfolder per component.

``model_index.json`` names the pipeline class (``_class_name``) and maps each component to
``[library, class name]``; plain values (a pipeline's settings) are stored as they are. fusediff
writes ``"diffusers"`` as the library of its own models and schedulers, which carry diffusers'
class names and file formats, so diffusers loads what fusediff saves (DESIGN.md, decision 4).
The whole directory is written to a temporary one and renamed (decision 6).

:class:`~fusediff.pipelines.DiffusionPipeline` saves itself through :func:`save_pipeline_directory`;
so does the trainer, which names its pipeline class without importing the pipelines.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from . import __version__
from .configuration import DIFFUSERS_FORMAT_VERSION
from .modeling import ModelMixin
from .utils.io import atomic_directory, write_json

MODEL_INDEX = "model_index.json"


def component_entry(component: Any) -> list[str | None]:
    """The ``[library, class]`` entry diffusers would write for ``component`` ([None, None] for None)."""
    if component is None:
        return [None, None]
    cls = type(component)
    parts = cls.__module__.split(".")
    if parts[0] == "diffusers" and len(parts) > 2 and parts[1] == "pipelines":  # e.g. diffusers' LDMBertModel
        return [parts[2], cls.__name__]
    if parts[0] in ("fusediff", "diffusers"):
        return [getattr(cls, "_diffusers_library", "diffusers"), cls.__name__]
    return [parts[0], cls.__name__]


def model_index(class_name: str, components: Mapping[str, Any], settings: Mapping[str, Any] | None = None
                ) -> dict[str, Any]:
    """The ``model_index.json`` object of pipeline ``class_name`` with ``components`` and plain ``settings``."""
    index: dict[str, Any] = dict(settings or {})
    index.update({name: component_entry(c) for name, c in components.items()})
    index.update(_class_name=class_name, _diffusers_version=DIFFUSERS_FORMAT_VERSION, _fusediff_version=__version__)
    return index


def save_pipeline_directory(save_directory: str | os.PathLike, index: Mapping[str, Any],
                            components: Mapping[str, Any], *, variant: str | None = None) -> None:
    """Write ``index`` as ``model_index.json`` and each component (None ones skipped) into its subfolder by
    its ``save_pretrained``, atomically as a whole; TypeError for a component that cannot be saved."""
    with atomic_directory(save_directory) as tmp:
        write_json(tmp / MODEL_INDEX, dict(index))
        for name, component in components.items():
            if component is None:
                continue
            if not hasattr(component, "save_pretrained"):
                raise TypeError(f"component {name!r} ({type(component).__name__}) cannot be saved")
            if isinstance(component, ModelMixin):
                component.save_pretrained(tmp / name, variant=variant)
            else:
                component.save_pretrained(tmp / name)
