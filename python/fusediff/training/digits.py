"""The handwritten-digits training data of fusediff's small models, and an in-memory dataset.

The data are scikit-learn's bundled 8x8 digits (1,797 images, values 0-16, ink bright on a
dark background; from the UCI optical recognition of handwritten digits set). They are
upscaled bilinearly to ``size`` x ``size`` and mapped to [-1, 1], ink at +1, which is what the
digits model shipped in ``fusediff/assets/digits`` was trained on (``scripts/train_digits.py``).

:class:`TensorDataset` holds a dict of equally long tensors in memory and hands out batches
as dicts (``{"sample": x0, "class_labels": y}``), the batch format of :mod:`fusediff.training`.
Limits: everything lives in memory; there is no file-backed or streaming dataset here.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 16  # side of the upscaled images the shipped digits model is trained on
NUM_CLASSES = 10  # digits 0-9

_SKLEARN_MISSING = ('the digits data come from scikit-learn, which is not installed: '
                   'pip install "fusediff[train]"')


def load_digits_images(size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Real digits as a (N, 1, size, size) float32 tensor in [-1, 1], and their labels as an (N,) int64 tensor."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(_SKLEARN_MISSING) from e

    data = load_digits()
    pixels = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    if size != pixels.shape[-1]:
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(data.target.astype(np.int64, copy=True))
    return (pixels.clamp(0, 1) * 2 - 1).contiguous(), labels


class TensorDataset:
    """Equally long tensors held in memory; ``dataset[indices]`` is a batch dict of those rows.

    ``TensorDataset(sample=images, class_labels=labels)``: every value must be a tensor whose
    first dimension is the number of items.
    """

    def __init__(self, **tensors: torch.Tensor) -> None:
        if not tensors:
            raise ValueError("TensorDataset needs at least one tensor (e.g. sample=images)")
        lengths = set()
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"TensorDataset: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() == 0:
                raise ValueError(f"TensorDataset: {name} must have a first (item) dimension, got a scalar")
            lengths.add(t.shape[0])
        if len(lengths) != 1:
            sizes = {name: t.shape[0] for name, t in tensors.items()}
            raise ValueError(f"TensorDataset: tensors differ in length: {sizes}")
        if lengths == {0}:
            raise ValueError("TensorDataset: the tensors are empty")
        self.tensors = dict(tensors)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: t[indices] for name, t in self.tensors.items()}

    def to(self, device: torch.device | str) -> TensorDataset:
        """The same data on ``device`` (a new dataset; this one is unchanged)."""
        return TensorDataset(**{name: t.to(device) for name, t in self.tensors.items()})

    @classmethod
    def wrap(cls, data: TensorDataset | Mapping[str, torch.Tensor] | torch.Tensor) -> TensorDataset:
        """``data`` as a TensorDataset: a dataset, a dict of tensors, or one tensor (taken as ``sample``)."""
        if isinstance(data, cls):
            return data
        if isinstance(data, torch.Tensor):
            return cls(sample=data)
        if isinstance(data, Mapping):
            return cls(**data)
        raise TypeError(f"data must be a TensorDataset, a dict of tensors or a tensor, got {type(data).__name__}")


class DigitsDataset(TensorDataset):
    """The digits of :func:`load_digits_images` as ``sample`` (N, 1, size, size) and ``class_labels`` (N,)."""

    def __init__(self, size: int = SIZE, with_labels: bool = True) -> None:
        images, labels = load_digits_images(size)
        super().__init__(**({"sample": images, "class_labels": labels} if with_labels else {"sample": images}))
