"""Models: ``torch.nn.Module`` + config, saved and loaded in diffusers' format (DESIGN.md, decisions 4, 6).

A model directory holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or
``diffusion_pytorch_model.<variant>.safetensors``, or shards listed in a
``...safetensors.index.json``), with diffusers' parameter names, so a directory saved by
either library loads in the other. Loading is strict: a missing, unexpected or wrongly
shaped weight raises an error that names it. Pickled ``.bin`` weights are refused unless
the caller passes ``allow_pickle=True`` (and even then load with ``weights_only=True``).
Saving writes to a temporary directory first (:func:`fusediff.utils.io.atomic_directory`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import torch

from .configuration import ConfigMixin
from .hub import PICKLE_PATTERNS, resolve_directory
from .utils.io import atomic_directory, contained_path, read_json, write_json

WEIGHTS_NAME = "diffusion_pytorch_model"  # + ".safetensors", ".safetensors.index.json" or ".bin"
M = TypeVar("M", bound="ModelMixin")


def _weights_file(name: str, variant: str | None, suffix: str) -> str:
    return f"{WEIGHTS_NAME}.{variant}.{suffix}" if variant else f"{WEIGHTS_NAME}.{suffix}"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError on a corrupt or truncated file
        raise ValueError(f"cannot read weights from {str(path)!r}: {e}") from None


def load_weights(directory: str | os.PathLike, *, variant: str | None = None,
                 allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict stored in ``directory`` and the file it came from.

    Looks for (in order) a single safetensors file, a sharded safetensors index, and, only
    with ``allow_pickle=True``, a pickled ``.bin`` file.
    """
    directory = Path(directory)
    single = directory / _weights_file(WEIGHTS_NAME, variant, "safetensors")
    if single.is_file():
        return _read_safetensors(single), single
    index = directory / _weights_file(WEIGHTS_NAME, variant, "safetensors.index.json")
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{str(index)!r} has no valid weight_map")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_read_safetensors(contained_path(directory, shard)))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise ValueError(f"{str(index)!r} lists weights its shards do not hold: {', '.join(missing[:10])}")
        return state, index
    pickled = directory / _weights_file(WEIGHTS_NAME, variant, "bin")
    if pickled.is_file():
        if not allow_pickle:
            raise ValueError(
                f"{str(pickled)!r} holds pickled weights, which can run code when loaded; fusediff loads "
                "safetensors only. Convert it, or pass allow_pickle=True if you trust its source.")
        return torch.load(pickled, map_location="cpu", weights_only=True), pickled
    found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    raise FileNotFoundError(f"no {single.name} in {str(directory)!r} (found: {', '.join(found) or 'nothing'})")


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise if ``state`` does not match ``model`` exactly, naming each offending weight."""
    expected = model.state_dict()
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:8])}"
                        f"{' ...' if len(unexpected) > 8 else ''}")
    for name in sorted(set(expected) & set(state)):
        if tuple(state[name].shape) != tuple(expected[name].shape):
            problems.append(f"{name} has shape {tuple(state[name].shape)}, the model expects "
                            f"{tuple(expected[name].shape)}")
    if problems:
        raise ValueError(f"weights in {source} do not fit {type(model).__name__}: " + "; ".join(problems))


class ModelMixin(torch.nn.Module, ConfigMixin):
    """Base of fusediff's models: a ``torch.nn.Module`` whose constructor arguments are its config."""

    config_name = "config.json"

    @property
    def device(self) -> torch.device:
        """Device of the first parameter (or buffer); CPU for a model without either."""
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the first floating-point parameter; float32 for a model without one."""
        for t in self.parameters():
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (only those with ``requires_grad`` when ``trainable_only``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def save_pretrained(self, save_directory: str | os.PathLike, *, variant: str | None = None) -> None:
        """Write ``config.json`` and the weights as safetensors into ``save_directory``, atomically."""
        from safetensors.torch import save_file

        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        with atomic_directory(save_directory) as tmp:
            write_json(tmp / self.config_name, self.config_dict_to_save())
            save_file(state, str(tmp / _weights_file(WEIGHTS_NAME, variant, "safetensors")),
                      metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls: type[M], pretrained_model_name_or_path: str | os.PathLike, *,
                        subfolder: str | None = None, torch_dtype: torch.dtype | None = None,
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool = False, token: str | bool | None = None,
                        variant: str | None = None, allow_pickle: bool = False,
                        **config_overrides: Any) -> M:
        """Load a model from a directory or Hub repo saved by fusediff or diffusers.

        ``torch_dtype`` casts the floating-point weights after loading; ``config_overrides``
        replace config values (they must still fit the stored weights). The model is returned
        in eval mode on the CPU. Called on :class:`ModelMixin` itself, the class is chosen by
        the config's ``_class_name``.
        """
        if torch_dtype is not None and not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
            raise TypeError(f"torch_dtype must be a floating torch.dtype; got {torch_dtype!r}")
        prefix = f"{subfolder}/" if subfolder else ""
        ignore = None if allow_pickle else [prefix + p for p in PICKLE_PATTERNS]
        directory = resolve_directory(pretrained_model_name_or_path, subfolder=subfolder, revision=revision,
                                      cache_dir=cache_dir, local_files_only=local_files_only, token=token,
                                      allow_patterns=[prefix + "*"], ignore_patterns=ignore)
        config = read_json(directory / cls.config_name) if (directory / cls.config_name).is_file() else None
        if config is None:
            raise FileNotFoundError(f"{str(directory)!r} has no {cls.config_name}")
        model_cls = cls._class_for(config)
        model = model_cls.from_config(config, **config_overrides)
        state, source = load_weights(directory, variant=variant, allow_pickle=allow_pickle)
        state = model_cls.convert_state_dict(state)
        check_state_dict(model, state, repr(str(source)))
        model.load_state_dict(state, strict=True)
        if torch_dtype is not None:
            model.to(torch_dtype)
        model.register_to_config(_name_or_path=os.fspath(pretrained_model_name_or_path))
        return model.eval()

    @classmethod
    def convert_state_dict(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename weights of older checkpoint layouts to this class's names (identity by default)."""
        return state

    @classmethod
    def _class_for(cls, config: dict[str, Any]) -> type[ModelMixin]:
        name = config.get("_class_name")
        if cls is not ModelMixin:
            return cls
        import fusediff

        model_cls = getattr(fusediff, name, None) if isinstance(name, str) else None
        if not (isinstance(model_cls, type) and issubclass(model_cls, ModelMixin)):
            raise ValueError(f"config names model class {name!r}, which fusediff does not have")
        return model_cls
