"""Small shared helpers: output containers, seeded noise, atomic file writes, logging."""

from .outputs import BaseOutput
from .torch_utils import randn_tensor

__all__ = ["BaseOutput", "randn_tensor"]
