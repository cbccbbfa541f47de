"""Output containers of models, schedulers and pipelines.

As in diffusers, an output is a dataclass whose fields read by name (``out.sample``), by
key (``out["sample"]``) or by position among the fields that are set (``out[0]``), so code
written for either library's outputs works with fusediff's.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class BaseOutput:
    """Base of the output dataclasses; subclasses declare their fields with ``@dataclass``."""

    def to_tuple(self) -> tuple[Any, ...]:
        """The fields that are not None, in declaration order (what ``return_dict=False`` returns)."""
        return tuple(v for v in (getattr(self, f.name) for f in dataclasses.fields(self)) if v is not None)

    def keys(self) -> list[str]:
        """Names of the fields that are not None."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.to_tuple())
