"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

Every file the project writes that someone may read back — updates, server state, statistics,
deltas, JSON results, request files — goes through `atomic_path`: the content is written to a
temporary file in the same folder (os.replace is atomic only within one file system), flushed and
fsynced, given the permissions an ordinary new file would get (mkstemp makes 0600), renamed over
the target, and the folder is fsynced so the rename survives a power loss. On any error the
temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _default_mode(path: Path) -> int:
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error, it replaces
    `path` (fsynced file and folder). The writer may reopen the temporary path by name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode(path))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike[str], payload, indent: int = 1) -> Path:
    return write_text(path, json.dumps(payload, indent=indent) + "\n")


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> Path:
    """safetensors needs at least one tensor; callers with none store a placeholder."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


class OutputError(ValueError):
    """An output location that would lose or overwrite something; nothing has been written."""


def writable_parent(path: Path) -> None:
    """The nearest existing ancestor of `path` is a folder this process may create in."""
    parent = path.resolve().parent
    existing = next((q for q in (parent, *parent.parents) if q.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot create it under {existing or parent}")


def check_output_file(path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Refuse, before any work, an output file that is a folder, exists (unless `overwrite`),
    or cannot be created."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists (pass --overwrite to replace it)")
    writable_parent(path)
    return path
