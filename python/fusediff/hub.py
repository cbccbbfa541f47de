"""Finding a checkpoint directory: a local path, or a Hugging Face Hub repository.

Everything that loads (configs, models, schedulers, pipelines) asks :func:`resolve_directory`
for a local directory. A path that exists is used as it is; anything else is taken as a Hub
repository id and fetched through ``huggingface_hub.snapshot_download`` into the usual cache
(or ``cache_dir``), which also serves it offline with ``local_files_only=True`` or
``HF_HUB_OFFLINE=1`` (DESIGN.md, decision 9).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

# Weight formats that hold pickles: never fetched unless the caller allows pickled weights.
PICKLE_PATTERNS = ("*.bin", "*.ckpt", "*.pt", "*.pth", "*.pkl")


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def resolve_directory(path_or_repo_id: str | os.PathLike, *, subfolder: str | None = None,
                      revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                      local_files_only: bool = False, token: str | bool | None = None,
                      allow_patterns: Sequence[str] | None = None,
                      ignore_patterns: Sequence[str] | None = None) -> Path:
    """The local directory of ``path_or_repo_id`` (joined with ``subfolder``), downloading if needed.

    Raises ``FileNotFoundError`` with one clear line when the path does not exist, the repo
    id is malformed, or the repository is neither cached nor reachable.
    """
    if not isinstance(path_or_repo_id, (str, os.PathLike)):
        raise TypeError(f"expected a directory or a Hub repo id; got {type(path_or_repo_id).__name__}")
    name = os.fspath(path_or_repo_id)
    if os.path.isdir(name):
        root = Path(name)
    elif isinstance(path_or_repo_id, os.PathLike) or _looks_local(name) or os.path.exists(name):
        raise FileNotFoundError(f"{name!r} is not a directory")
    else:
        root = _download(name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                         token=token, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
    if subfolder:
        from .utils.io import contained_path
        directory = contained_path(root, subfolder)
        if not directory.is_dir():
            raise FileNotFoundError(f"{name!r} has no subfolder {subfolder!r}")
        return directory
    return root


def _download(repo_id: str, **kwargs) -> Path:
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, **kwargs))
    except HFValidationError:
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local directory nor a valid Hugging Face Hub repo id") from None
    except Exception as e:  # offline and not cached, unknown repo or revision, network failure
        where = "in the local cache" if kwargs.get("local_files_only") else "locally or on the Hugging Face Hub"
        raise FileNotFoundError(
            f"could not find {repo_id!r} {where} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
