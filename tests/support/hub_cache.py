"""Builds a Hugging Face Hub cache on disk, so hub loading is tested offline (DESIGN.md, decision 9).

The layout is huggingface_hub's: ``models--{org}--{name}/snapshots/{commit}/...`` holds the
files (here as symlinks into ``blobs/``, as the real cache does) and ``refs/{revision}``
names the commit.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def add_to_cache(cache_dir: Path, repo_id: str, source: Path, revision: str = "main") -> Path:
    """Copy the directory ``source`` into ``cache_dir`` as repo ``repo_id`` at ``revision``; returns the snapshot."""
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for path in sorted(Path(source).rglob("*")):
        if path.is_dir():
            continue
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot
