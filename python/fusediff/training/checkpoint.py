"""Atomic training checkpoints: ``out_dir/checkpoints/step_000500/``, a ``latest`` marker, pruning, resolving.

A checkpoint directory holds

    unet/                 the raw weights, as ``save_pretrained`` writes them (loads in diffusers)
    unet_ema/             the EMA weights, likewise (what the final pipeline holds)
    training_state.pt     optimizer, learning-rate, GradScaler and EMA state, step, data position and
                          RNG states: tensors, numbers, strings, lists and dicts only, read back with
                          ``torch.load(weights_only=True)`` (DESIGN.md decision 6: no pickled code)

It is written into a temporary directory beside its final place and renamed when complete
(:func:`fusediff.utils.io.atomic_directory`), then ``checkpoints/latest`` (a one-line text file
naming it) is replaced atomically, then the oldest are pruned to ``keep``. A crash at any point
leaves either the previous ``latest`` or the new one, never a half-written directory under a
``step_*`` name: a leftover ``.step_*.tmp-*`` directory is ignored and removed by the next save.
Limits: the checkpoint is written by one process (rank 0) to a filesystem the others can read.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..utils.io import atomic_directory

CHECKPOINTS = "checkpoints"  # subdirectory of the output directory
LATEST = "latest"  # marker file naming the newest complete checkpoint
STATE_FILE = "training_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint after ``step`` optimizer steps: ``step_000500``."""
    return f"step_{step:06d}"


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints under ``out_dir/checkpoints``, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(out_dir: str | os.PathLike, step: int, write: Callable[[Path], None],
                    keep: int | None = None) -> Path:
    """Write checkpoint ``step`` with ``write(tmp_dir)`` atomically, point ``latest`` at it, prune to ``keep``.

    ``write`` fills a temporary directory; if it raises, nothing visible changes. ``keep`` None or
    0 keeps every checkpoint; otherwise the newest ``keep`` remain (the one just written always).
    """
    if keep is not None and keep < 0:
        raise ValueError(f"keep must be >= 0 or None, got {keep}")
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step_*.tmp-*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    target = root / checkpoint_name(step)
    if target.exists():  # a re-run over the same step: replace it whole
        shutil.rmtree(target)
    with atomic_directory(target) as tmp:
        write(tmp)
        if not (tmp / STATE_FILE).is_file():
            raise RuntimeError(f"checkpoint writer left no {STATE_FILE} in {tmp}")
    _write_text_atomic(root / LATEST, target.name + "\n")
    if keep:
        for _, old in list_checkpoints(out_dir)[:-keep]:
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    return target


def resolve_checkpoint(out_dir: str | os.PathLike, spec: str | os.PathLike = LATEST) -> Path:
    """The checkpoint directory named by ``spec``: "latest" (of ``out_dir``) or a checkpoint's path.

    "latest" follows the marker and, if the marker is missing or names no complete checkpoint,
    takes the newest complete ``step_*`` directory. Raises FileNotFoundError when there is none.
    """
    if str(spec) == LATEST:
        root = Path(out_dir) / CHECKPOINTS
        marker = root / LATEST
        if marker.is_file():
            name = marker.read_text(encoding="utf-8").strip()
            if _STEP_DIR.match(name) and (root / name / STATE_FILE).is_file():
                return root / name
        found = list_checkpoints(out_dir)
        if not found:
            raise FileNotFoundError(f"no checkpoint to resume from in {str(root)!r}")
        return found[-1][1]
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {str(path)!r} is not a directory")
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a complete checkpoint: it holds no {STATE_FILE}")
    return path


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write a training-state dict (tensors, numbers, strings, lists, dicts) with torch.save and fsync."""
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training-state dict with ``torch.load(weights_only=True)``, onto the CPU."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} does not hold a training-state dict")
    return state
