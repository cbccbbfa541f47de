"""Input images of the DeepFloyd IF pipelines (img2img and super resolution), read as diffusers' IF pipelines read them.

- PIL images: converted to RGB, mapped to [-1, 1] by x / 127.5 - 1; img2img first resizes them so
  the short side is the UNet's sample size and the long one the nearest multiple of 8 keeping the
  aspect ratio (bicubic), as diffusers' ``resize`` does; super resolution takes them as they are.
- numpy arrays ((H, W, C) or (B, H, W, C)) and torch tensors ((C, H, W) or (B, C, H, W)), or lists of
  them: taken as already in [-1, 1] (what stage I returns with ``output_type="pt"``), not rescaled.

The result is a (B, C, H, W) float tensor. Bad input raises: an unknown type, a list mixing types,
images of different sizes, arrays or tensors of other ranks. Differences from diffusers (pinned in
tests/pipelines/test_if_inputs.py): a (C, H, W) tensor alone is one image, and a list of 4-D arrays is
concatenated for super resolution too (diffusers' super resolution keeps only the first array).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch


def resized_to_sample_size(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """Short side ``size``, long side round(size * aspect / 8) * 8, bicubic (diffusers' IF img2img ``resize``)."""
    w, h = image.size
    aspect = w / h
    new_w, new_h = size, size
    if aspect >= 1:
        new_w = int(round(size / 8 * aspect) * 8)
    else:
        new_h = int(round(size / 8 / aspect) * 8)
    return image.resize((new_w, new_h), resample=PIL.Image.Resampling.BICUBIC, reducing_gap=None)


def _kind(x: Any) -> type | None:
    for kind in (PIL.Image.Image, np.ndarray, torch.Tensor):
        if isinstance(x, kind):
            return kind
    return None


def if_image_tensor(image: Any, resize_to: int | None = None) -> torch.Tensor:
    """(B, C, H, W) float tensor in [-1, 1] of a PIL image, array, tensor or list of one kind of them;
    PIL images are resized with :func:`resized_to_sample_size` when ``resize_to`` is given."""
    images = image if isinstance(image, list) else [image]
    kinds = {_kind(i) for i in images}
    if not images or None in kinds or len(kinds) > 1:
        names = sorted({type(i).__name__ for i in images}) or ["an empty list"]
        raise TypeError(f"image must be a PIL image, numpy array or torch tensor, or a list of one of these; "
                        f"got {', '.join(names)}")
    kind = kinds.pop()
    if kind is PIL.Image.Image:
        images = [i.convert("RGB") for i in images]
        if resize_to is not None:
            images = [resized_to_sample_size(i, resize_to) for i in images]
        if len({i.size for i in images}) > 1:
            raise ValueError(f"images of different sizes: {sorted({i.size for i in images})}")
        batch = np.stack([np.asarray(i).astype(np.float32) / 127.5 - 1.0 for i in images])
        return torch.from_numpy(batch.transpose(0, 3, 1, 2))
    ranks = {i.ndim for i in images}
    if len(ranks) > 1 or not ranks <= {3, 4}:
        raise ValueError(f"image arrays and tensors must all be 3-D or all 4-D; got ranks {sorted(ranks)}")
    join = (np.concatenate if kind is np.ndarray else torch.cat) if 4 in ranks else \
        (np.stack if kind is np.ndarray else torch.stack)
    try:
        batch = join(images)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"images of different shapes: {sorted({tuple(i.shape) for i in images})}") from e
    if kind is np.ndarray:
        batch = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))
    if not batch.is_floating_point():
        raise TypeError(f"image arrays and tensors must be floats in [-1, 1]; got {batch.dtype}")
    return batch


def check_image(image: torch.Tensor, channels: int, multiple: int, batch: int, what: str = "image") -> None:
    """ValueError unless ``image`` has ``channels`` channels, sides that are multiples of ``multiple``
    (when ``multiple`` > 0) and ``batch`` images (one per prompt)."""
    if image.shape[1] != channels:
        raise ValueError(f"{what} has {image.shape[1]} channels (shape {tuple(image.shape)}); the UNet takes "
                         f"{channels}: pass (B, {channels}, H, W) tensors or (B, H, W, {channels}) arrays")
    if multiple > 0 and (image.shape[2] % multiple or image.shape[3] % multiple):
        raise ValueError(f"{what} is {image.shape[2]} x {image.shape[3]}; its sides must be multiples of "
                         f"{multiple} (the UNet's down-sampling factor)")
    if image.shape[0] != batch:
        raise ValueError(f"got {image.shape[0]} images for {batch} prompts; pass one image per prompt")
