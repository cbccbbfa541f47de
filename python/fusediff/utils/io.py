"""Atomic saving and checked paths (DESIGN.md, decision 6).

:func:`atomic_directory` hands out a temporary directory beside the target; only when
everything has been written without error does it move the result into place, so a failed
save leaves the target as it was. A new target directory appears in one ``rename``. Into an
existing directory, each top-level entry is swapped in with one rename (a subdirectory is
replaced as a whole), after every file has been written in full; other files already in
the directory are left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any


def _swap_in(src: Path, dst: Path) -> None:
    """Replace ``dst`` (file, directory or nothing) by ``src`` with renames."""
    if src.is_dir() and dst.exists() and not dst.is_symlink():
        trash = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, trash / dst.name)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _normal_permissions(root: Path) -> None:
    """Give what was written the permissions a plain write would (mkdtemp makes 0700 directories)."""
    mask = _current_umask()
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory whose contents become ``target`` if the block succeeds."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"cannot save to {str(target)!r}: it exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _normal_permissions(tmp)
        if not target.exists():
            os.replace(tmp, target)
            return
        for entry in sorted(tmp.iterdir()):
            _swap_in(entry, target / entry.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write ``data`` as indented, key-sorted JSON (used inside an :func:`atomic_directory`)."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON object from ``path``; a missing file or bad JSON raises an error naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{str(path)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object; got {type(data).__name__}")
    return data


def contained_path(root: str | os.PathLike, relative: str) -> Path:
    """``root / relative``, refusing any ``relative`` that could leave ``root``.

    The check is on the name itself (no absolute paths, drive letters or ``..`` parts), so it
    holds for Hugging Face cache snapshots, whose files are symbolic links into a blob store.
    """
    if not isinstance(relative, str) or not relative.strip() or "\x00" in relative:
        raise ValueError(f"invalid path {relative!r} under {str(root)!r}")
    parts = PurePosixPath(relative.replace("\\", "/")).parts
    if relative.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise ValueError(f"path {relative!r} escapes the directory {str(root)!r}")
    return Path(root).joinpath(*parts)
