"""DiffusionPipeline: named components (models, schedulers, tokenizers) saved and loaded together.

A pipeline directory is diffusers' layout: ``model_index.json`` maps each component name to
``[library, class name]`` and each component lives in the subfolder of that name. fusediff
writes ``"diffusers"`` as the library of its own models and schedulers (they carry diffusers'
class names and file formats), so diffusers loads a directory fusediff saved, and fusediff
reads ``"diffusers"`` or ``"fusediff"`` entries as its own class of that name. Components of
``transformers`` (a CLIP text encoder, a tokenizer) load through that library; without it,
loading such a pipeline raises an ImportError naming the ``text`` extra. diffusers names classes
defined in its pipeline modules by that module (``["latent_diffusion", "LDMBertModel"]``):
fusediff reads those entries as its own class of that name, and writes them the same way. A
pipeline lists in ``_unsupported_components`` the components it never uses (Stable Diffusion's
safety checker): their entries load as None, with a warning. Assigning a component
(``pipe.scheduler = ...``) updates its entry, as in diffusers. Component names must be
identifiers, so a ``model_index.json`` never points outside its directory (DESIGN.md,
decision 6); pickled weights are refused unless ``allow_pickle=True``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from ..configuration import ConfigMixin
from ..hub import PICKLE_PATTERNS, resolve_directory
from ..modeling import ModelMixin
from ..pipeline_directory import MODEL_INDEX, component_entry, save_pipeline_directory
from ..utils.io import contained_path, read_json
from ..utils.outputs import BaseOutput
from ..sampling import SamplingRuntime

logger = logging.getLogger(__name__)

P = TypeVar("P", bound="DiffusionPipeline")
OUTPUT_TYPES = ("pil", "np", "pt")
# Libraries whose classes a model_index.json may name; importing any other is refused.
_OWN_LIBRARIES = ("fusediff", "diffusers")
_OTHER_LIBRARIES = ("transformers",)
# diffusers pipeline modules that define components (model_index.json names them as the library)
_PIPELINE_MODULES = ("stable_diffusion", "latent_diffusion")
TEXT_EXTRA_HINT = 'pip install "fusediff[text]"'


@dataclasses.dataclass
class ImagePipelineOutput(BaseOutput):
    """Images of an image pipeline: PIL images, a (B, H, W, C) numpy array or a (B, C, H, W) tensor."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def numpy_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
    """(B, H, W, C) or (H, W, C) floats in [0, 1] to PIL images (mode L for one channel)."""
    if images.ndim == 3:
        images = images[None]
    pixels = (images * 255).round().astype("uint8")
    if pixels.shape[-1] == 1:
        return [PIL.Image.fromarray(p[..., 0], mode="L") for p in pixels]
    return [PIL.Image.fromarray(p) for p in pixels]


def check_output_type(output_type: str, allowed: tuple[str, ...] = OUTPUT_TYPES) -> None:
    """ValueError unless ``output_type`` is one of ``allowed``."""
    if output_type not in allowed:
        raise ValueError(f"output_type must be one of {', '.join(allowed)}; got {output_type!r}")


def postprocess_images(image: torch.Tensor, output_type: str, do_denormalize: Sequence[bool] | None = None) -> Any:
    """(B, C, H, W) model or decoder output in [-1, 1] to PIL images, a (B, H, W, C) float32 array, a
    (B, C, H, W) tensor in [0, 1], or the input itself (``"latent"``). ``do_denormalize[i] = False``
    leaves image i as it is (a safety checker's black image)."""
    if output_type == "latent":
        return image
    if do_denormalize is None:
        image = (image * 0.5 + 0.5).clamp(0, 1)
    else:
        image = torch.stack([(x * 0.5 + 0.5).clamp(0, 1) if d else x for x, d in zip(image, do_denormalize)])
    if output_type == "pt":
        return image
    array = image.cpu().permute(0, 2, 3, 1).float().numpy()
    return numpy_to_pil(array) if output_type == "pil" else array


class GuidedCallState:
    """What a step callback may read of the running call, as in diffusers: the guidance scale, whether
    classifier-free guidance runs (a scale above 1) and the number of timesteps. Pipelines set
    ``_guidance_scale`` and ``_num_timesteps`` during a call."""

    _guidance_scale: float = 1.0
    _num_timesteps: int = 0

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps


def check_callback_tensor_inputs(names: Sequence[str], allowed: Sequence[str]) -> None:
    """Raise ValueError when a step callback asks for tensors the pipeline does not hand out."""
    unknown = [k for k in names if k not in allowed]
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} are not among {list(allowed)}")


def unet_prediction(unet: Any, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The output tensor of a diffusers-style UNet call, ``unet(x, t, **kwargs).sample``: a loop's ``predict``."""
    return unet(x, t, **kwargs).sample


def _resolve_class(library: str, class_name: str, component: str) -> type:
    if library in _OWN_LIBRARIES or library in _PIPELINE_MODULES:
        module = importlib.import_module("fusediff")
    elif library in _OTHER_LIBRARIES:
        try:
            module = importlib.import_module(library)
        except ImportError:
            hint = TEXT_EXTRA_HINT if library == "transformers" else f"pip install {library}"
            raise ImportError(f"component {component!r} ({class_name}) needs the {library!r} package: {hint}") from None
    else:
        raise ValueError(f"component {component!r} names library {library!r}; fusediff loads components "
                         f"from {', '.join(_OWN_LIBRARIES + _PIPELINE_MODULES + _OTHER_LIBRARIES)} only")
    cls = getattr(module, class_name, None) if isinstance(class_name, str) else None
    if not isinstance(cls, type):
        owner = "fusediff" if library in _OWN_LIBRARIES + _PIPELINE_MODULES else library
        raise ValueError(f"component {component!r} names class {class_name!r}, which {owner} does not have")
    return cls


class DiffusionPipeline(SamplingRuntime, ConfigMixin):
    """Base of pipelines: holds components, moves them between devices, saves and loads them; the
    loop's run-time choices (CUDA graphs) come from :class:`~fusediff.sampling.SamplingRuntime`."""

    config_name = MODEL_INDEX
    # Constructor arguments stored in model_index.json as plain values, not [library, class] pairs.
    _config_arguments: tuple[str, ...] = ()
    # Components the pipeline never uses: a model_index.json entry naming one loads as None.
    _unsupported_components: tuple[str, ...] = ()

    def register_modules(self, **components: Any) -> None:
        """Set each component as an attribute and record its ``[library, class]`` in the config."""
        for name, component in components.items():
            if not name.isidentifier():
                raise ValueError(f"component name {name!r} must be a Python identifier")
            setattr(self, name, component)
            self.register_to_config(**{name: component_entry(component)})

    def __setattr__(self, name: str, value: Any) -> None:
        """Assigning a registered component (``pipe.scheduler = ...``) also updates its model_index entry."""
        config = self.__dict__.get("_internal_dict", {})
        if name in self.__dict__ and name in config and name not in self._config_arguments:
            self.register_to_config(**{name: component_entry(value)})
        super().__setattr__(name, value)

    # -- components and devices ----------------------------------------------------------
    @property
    def components(self) -> dict[str, Any]:
        """The components by name, as the constructor takes them."""
        names = [n for n in self._component_names() if n in self.config and n not in self._config_arguments]
        return {n: getattr(self, n) for n in names}

    @classmethod
    def _component_names(cls) -> list[str]:
        params = inspect.signature(cls.__init__).parameters
        return [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def _modules(self) -> list[torch.nn.Module]:
        return [c for c in self.components.values() if isinstance(c, torch.nn.Module)]

    @property
    def device(self) -> torch.device:
        """Device of the first torch module among the components (CPU if there is none)."""
        for module in self._modules():
            for t in module.parameters():
                return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the first torch module among the components."""
        for module in self._modules():
            for t in module.parameters():
                if t.is_floating_point():
                    return t.dtype
        return torch.float32

    def to(self: P, *args: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> P:
        """Move every torch module to ``device`` and/or cast it to ``dtype``; returns the pipeline.

        Accepts ``to("cuda")``, ``to(torch.float16)``, ``to("cuda", torch.float16)`` and keywords.
        """
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, (str, torch.device)):
                device = arg
            else:
                raise TypeError(f"to() takes a device and/or a dtype; got {arg!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"to() needs a floating dtype; got {dtype}")
        device = torch.device(device) if device is not None else None
        for module in self._modules():
            module.to(device=device, dtype=dtype)
        return self

    # -- progress bars -------------------------------------------------------------------
    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Keyword arguments for tqdm in later calls, e.g. ``disable=True`` or ``desc="sampling"``."""
        self._progress_bar_config = kwargs

    @torch.compiler.disable
    def progress_bar(self, iterable: Any = None, total: int | None = None) -> tqdm:
        """A tqdm bar over ``iterable`` (or of ``total`` steps) with the configured options."""
        config = dict(getattr(self, "_progress_bar_config", {}))
        if iterable is not None:
            return tqdm(iterable, **config)
        if total is not None:
            return tqdm(total=total, **config)
        raise ValueError("progress_bar needs an iterable or a total")

    numpy_to_pil = staticmethod(numpy_to_pil)

    # -- saving --------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *, variant: str | None = None) -> None:
        """Write ``model_index.json`` and each component into its subfolder, atomically as a whole."""
        save_pipeline_directory(save_directory, self.config_dict_to_save(), self.components, variant=variant)

    # -- loading -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls: type[P], pretrained_model_name_or_path: str | os.PathLike, *,
                        torch_dtype: torch.dtype | None = None, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        token: str | bool | None = None, variant: str | None = None,
                        allow_pickle: bool = False, **kwargs: Any) -> P:
        """Load a pipeline from a directory or Hub repo saved by fusediff or diffusers.

        Called on :class:`DiffusionPipeline`, the class named in ``model_index.json`` is used;
        called on a subclass, that subclass. Keyword arguments named like a component replace
        it (``scheduler=DDIMScheduler(...)``); others go to the constructor.
        """
        # From the Hub: model_index.json first, then only the folders of the components to load
        hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        directory = resolve_directory(pretrained_model_name_or_path, allow_patterns=[cls.config_name], **hub)
        index_path = directory / cls.config_name
        if not index_path.is_file():
            raise FileNotFoundError(f"{str(directory)!r} has no {cls.config_name}; is it a pipeline directory?")
        index = read_json(index_path)
        pipeline_cls = cls._pipeline_class(index)
        directory = resolve_directory(pretrained_model_name_or_path, **hub,
                                      allow_patterns=pipeline_cls._download_patterns(index, kwargs),
                                      ignore_patterns=_ignored_files(allow_pickle, variant))
        expected = pipeline_cls._component_names()
        init: dict[str, Any] = {}
        for name, entry in index.items():
            if name.startswith("_"):
                continue
            if name not in expected:
                logger.warning("%s: %r in %s is not an argument of %s; ignored", directory, name,
                               cls.config_name, pipeline_cls.__name__)
                continue
            if name in kwargs:
                init[name] = kwargs.pop(name)
            elif name in pipeline_cls._config_arguments:  # a plain value, e.g. a flag
                init[name] = entry
            elif name in pipeline_cls._unsupported_components and isinstance(entry, (list, tuple)) \
                    and entry and entry[0] is not None:
                logger.warning("%s: component %r (%s) is not supported by fusediff and is loaded as None",
                               directory, name, entry[-1])
                init[name] = None
            elif isinstance(entry, (list, tuple)) and len(entry) == 2:
                init[name] = _load_component(directory, name, entry, torch_dtype=torch_dtype, variant=variant,
                                             allow_pickle=allow_pickle)
            else:
                raise ValueError(f"{str(index_path)!r}: the entry of component {name!r} must be "
                                 f"[library, class name]; got {entry!r}")
        init.update({k: kwargs.pop(k) for k in list(kwargs) if k in expected})
        if kwargs:
            raise TypeError(f"{pipeline_cls.__name__}.from_pretrained got unexpected arguments: {', '.join(kwargs)}")
        missing = [n for n in expected if n not in init
                   and inspect.signature(pipeline_cls.__init__).parameters[n].default is inspect.Parameter.empty]
        if missing:
            raise ValueError(f"{str(index_path)!r} lacks component(s) {', '.join(missing)} "
                             f"that {pipeline_cls.__name__} needs")
        return pipeline_cls(**init)

    @classmethod
    def _download_patterns(cls, index: dict[str, Any], passed: dict[str, Any]) -> list[str]:
        """The files of a Hub repo that loading needs: model_index.json and the folders of the components
        that load from it (not the ones passed in, null, plain values or unsupported)."""
        folders = [name for name, entry in index.items()
                   if name.isidentifier() and name not in passed and name not in cls._config_arguments
                   and name not in cls._unsupported_components and isinstance(entry, (list, tuple))
                   and len(entry) == 2 and entry[0] is not None]
        return [cls.config_name, *(f"{name}/*" for name in folders)]

    @classmethod
    def _pipeline_class(cls, index: dict[str, Any]) -> type[DiffusionPipeline]:
        if cls is not DiffusionPipeline:
            return cls
        import fusediff

        name = index.get("_class_name")
        if isinstance(name, (list, tuple)) and len(name) == 2 and name[0] in ("fusediff", "diffusers"):
            name = name[1]  # ["library", "ClassName"], as components are named
        pipeline_cls = getattr(fusediff, name, None) if isinstance(name, str) else None
        if not (isinstance(pipeline_cls, type) and issubclass(pipeline_cls, DiffusionPipeline)):
            raise ValueError(f"model_index.json names pipeline class {name!r}, which fusediff does not have")
        return pipeline_cls


# Weights of other frameworks, never loaded
_FOREIGN_WEIGHTS = ("*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.pb", "*.ot")
# Weight variants Hub repos hold beside the default files (diffusion_pytorch_model.fp16.safetensors, ...)
_VARIANTS = ("fp16", "bf16", "non_ema", "ema")


def _ignored_files(allow_pickle: bool, variant: str | None) -> list[str]:
    """Patterns of repo files not to download: pickles (unless allowed), other frameworks, other variants."""
    pickles = [] if allow_pickle else list(PICKLE_PATTERNS)
    return pickles + list(_FOREIGN_WEIGHTS) + [f"*.{v}.*" for v in _VARIANTS if v != variant]


def _load_component(directory: Path, name: str, entry: list[Any], *, torch_dtype: torch.dtype | None,
                    variant: str | None, allow_pickle: bool) -> Any:
    """Load component ``name`` from ``directory/name`` as the ``[library, class]`` entry says."""
    library, class_name = entry
    if library is None and class_name is None:
        return None
    if not name.isidentifier():
        raise ValueError(f"component name {name!r} in model_index.json is not an identifier")
    folder = contained_path(directory, name)
    if not folder.is_dir():
        raise FileNotFoundError(f"component {name!r} has no folder in {str(directory)!r}")
    component_cls = _resolve_class(library, class_name, name)
    if issubclass(component_cls, ModelMixin):
        return component_cls.from_pretrained(folder, torch_dtype=torch_dtype, variant=variant,
                                             allow_pickle=allow_pickle)
    if library in _OWN_LIBRARIES:
        return component_cls.from_pretrained(folder)
    options: dict[str, Any] = {"local_files_only": True}
    if isinstance(component_cls, type) and issubclass(component_cls, torch.nn.Module):
        options["use_safetensors"] = not allow_pickle or None
        if torch_dtype is not None:
            options["dtype"] = torch_dtype
    return component_cls.from_pretrained(folder, **options)
