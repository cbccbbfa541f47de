"""Configuration: the constructor's arguments, frozen, saved and loaded as JSON (DESIGN.md, decision 7).

A class that mixes in :class:`ConfigMixin` and decorates ``__init__`` with
:func:`register_to_config` records every constructor argument (defaults filled in) in
``self.config``, a read-only mapping that also reads by attribute. ``save_config`` writes it
as JSON under ``config_name`` (``config.json`` for models, ``scheduler_config.json`` for
schedulers), ``load_config`` reads it from a directory or a Hub repo, and ``from_config``
builds an instance from such a dict, also one saved by a related class
(``DDIMScheduler.from_config(ddpm.config)``). The JSON matches diffusers' key for key, so
either library reads the other's files.

Keys that the class does not take are kept in ``config`` (so they survive a round trip) and
reported with a warning, unless they belong to a class listed in ``_compatibles``. As in
diffusers, ``config["_use_default_values"]`` lists the arguments that took their defaults (it is
not saved; after loading it lists the keys the file lacked), and ``from_config`` leaves those to
the new class's own defaults: ``PNDMScheduler.from_config(DDIMScheduler().config)`` keeps PNDM's
``set_alpha_to_one=False``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from . import __version__
from .hub import resolve_directory
from .utils.io import atomic_directory, read_json, write_json

logger = logging.getLogger(__name__)

# The diffusers release whose file format fusediff writes; diffusers reads it to pick
# compatibility behaviour when it loads a checkpoint, so it must be a real diffusers version.
DIFFUSERS_FORMAT_VERSION = "0.42.1"
# Keys written by the saving library, not constructor arguments; they are rewritten on save.
_BOOKKEEPING_KEYS = ("_class_name", "_diffusers_version", "_fusediff_version", "_use_default_values",
                     "_name_or_path")

C = TypeVar("C", bound="ConfigMixin")


class FrozenDict(dict):
    """A dict that cannot be changed after construction; items also read as attributes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.__dict__["_frozen"] = True

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a config is frozen after construction; build a new object with "
                        "from_config(config, key=value) instead")

    __setitem__ = __delitem__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse
    __ior__ = _refuse

    def __setattr__(self, name: str, value: Any) -> None:
        self._refuse()

    def __delattr__(self, name: str) -> None:
        self._refuse()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __reduce__(self):  # pickling and deepcopy rebuild through __init__, not __setitem__
        return (type(self), (dict(self),))


def _jsonable(value: Any) -> Any:
    """Config values as JSON types: tuples become lists, arrays lists, paths strings."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays and scalars, tensors
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"config value of type {type(value).__name__} cannot be saved as JSON: {value!r}")


def _init_keys(cls: type) -> set[str]:
    params = inspect.signature(cls.__init__).parameters
    return {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


class ConfigMixin:
    """Mixin for classes whose constructor arguments are their configuration.

    Class attributes: ``config_name`` (the JSON file's name), ``ignore_for_config``
    (arguments not recorded), ``_compatibles`` (names of classes in :mod:`fusediff` whose
    configs this class reads without warning).
    """

    config_name: str | None = None
    ignore_for_config: tuple[str, ...] = ()
    _compatibles: tuple[str, ...] = ()

    @property
    def config(self) -> FrozenDict:
        """The frozen configuration: every constructor argument, plus keys kept from a loaded file."""
        try:
            return self.__dict__["_internal_dict"]
        except KeyError:
            raise AttributeError(f"{type(self).__name__}.__init__ is not decorated with @register_to_config") from None

    @config.setter
    def config(self, value: Any) -> None:
        raise AttributeError("config is frozen after construction; use from_config(config, key=value)")

    def register_to_config(self, **kwargs: Any) -> None:
        """Add ``kwargs`` to the config (used by :func:`register_to_config` and loaders)."""
        merged = dict(self.__dict__.get("_internal_dict", {}))
        merged.update(kwargs)
        self.__dict__["_internal_dict"] = FrozenDict(merged)

    # -- saving ------------------------------------------------------------------------
    def config_dict_to_save(self) -> dict[str, Any]:
        """The JSON object ``save_config`` writes: the config plus the class name and versions."""
        data = {k: _jsonable(v) for k, v in self.config.items() if k not in _BOOKKEEPING_KEYS}
        data["_class_name"] = type(self).__name__
        data["_diffusers_version"] = DIFFUSERS_FORMAT_VERSION
        data["_fusediff_version"] = __version__
        return data

    def save_config(self, save_directory: str | os.PathLike) -> None:
        """Write the config as ``save_directory/config_name``, atomically."""
        if self.config_name is None:
            raise NotImplementedError(f"{type(self).__name__} defines no config_name")
        with atomic_directory(save_directory) as tmp:
            write_json(tmp / self.config_name, self.config_dict_to_save())

    # -- loading -----------------------------------------------------------------------
    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike, *, subfolder: str | None = None,
                    revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                    local_files_only: bool = False, token: str | bool | None = None) -> dict[str, Any]:
        """Read ``config_name`` from a directory, or a Hub repo, optionally inside ``subfolder``."""
        if cls.config_name is None:
            raise NotImplementedError(f"{cls.__name__} defines no config_name")
        pattern = f"{subfolder}/{cls.config_name}" if subfolder else cls.config_name
        directory = resolve_directory(pretrained_model_name_or_path, subfolder=subfolder, revision=revision,
                                      cache_dir=cache_dir, local_files_only=local_files_only, token=token,
                                      allow_patterns=[pattern])
        path = Path(directory) / cls.config_name
        if not path.is_file():
            raise FileNotFoundError(f"{str(directory)!r} has no {cls.config_name}")
        return read_json(path)

    @classmethod
    def _compatible_keys(cls) -> set[str]:
        import fusediff

        keys: set[str] = set()
        for name in cls._compatibles:
            other = getattr(fusediff, name, None)
            if isinstance(other, type):
                keys |= _init_keys(other)
        return keys

    @classmethod
    def extract_init_dict(cls, config: Mapping[str, Any], **overrides: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split ``config`` (+ ``overrides``) into constructor arguments and the keys to keep beside them."""
        expected = _init_keys(cls) - set(cls.ignore_for_config)
        defaulted = set(config.get("_use_default_values", ()))  # the source's defaults are not choices
        merged = {k: v for k, v in config.items() if k not in _BOOKKEEPING_KEYS and k not in defaulted}
        unknown_overrides = sorted(set(overrides) - expected)
        if unknown_overrides:
            raise TypeError(f"{cls.__name__} takes no argument(s) {', '.join(unknown_overrides)}")
        merged.update(overrides)
        init = {k: merged.pop(k) for k in list(merged) if k in expected}
        unknown = sorted(k for k in merged if not k.startswith("_") and k not in cls._compatible_keys())
        if unknown:
            logger.warning("%s: config keys %s are not arguments of %s; they are kept in its config but unused",
                           config.get("_class_name", "config"), ", ".join(unknown), cls.__name__)
        return init, merged

    @classmethod
    def from_config(cls: type[C], config: Mapping[str, Any], **overrides: Any) -> C:
        """Build an instance from a config dict (any related class's), with ``overrides`` applied."""
        if isinstance(config, ConfigMixin):
            config = config.config
        if not isinstance(config, Mapping):
            raise TypeError(f"from_config expects a config mapping; got {type(config).__name__}")
        init, kept = cls.extract_init_dict(config, **overrides)
        obj = cls(**init)
        if kept:
            obj.register_to_config(**kept)
        return obj


def register_to_config(init: Callable[..., None]) -> Callable[..., None]:
    """Decorate ``__init__`` of a :class:`ConfigMixin` so that its arguments become the config."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: ConfigMixin, *args: Any, **kwargs: Any) -> None:
        if not isinstance(self, ConfigMixin):
            raise TypeError(f"@register_to_config needs a ConfigMixin; {type(self).__name__} is not one")
        bound = signature.bind(self, *args, **kwargs)
        passed = set(bound.arguments)
        bound.apply_defaults()
        config: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = signature.parameters[name].kind
            if name == "self" or name in type(self).ignore_for_config or kind == inspect.Parameter.VAR_POSITIONAL:
                continue
            if kind == inspect.Parameter.VAR_KEYWORD:
                config.update(value)
            else:
                config[name] = value
        defaulted = sorted(name for name in config if name not in passed and name not in kwargs)
        if defaulted:  # as diffusers: a class swap gives these the new class's defaults
            config["_use_default_values"] = defaulted
        self.register_to_config(**config)
        init(self, *args, **kwargs)

    return wrapper
