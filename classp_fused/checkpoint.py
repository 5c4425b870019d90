"""Crash-safe checkpoint files: a save either completes or leaves the previous file as it was."""
from __future__ import annotations

import os
import secrets
from typing import Any

import torch


def save_checkpoint(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically.

    The bytes go to a temporary file in the same directory, are flushed and fsynced, and the
    file is then renamed over ``path`` with ``os.replace`` (atomic on POSIX and Windows); the
    directory is fsynced so that the rename survives a power loss. On an error the temporary
    file is removed and ``path`` is untouched. A process killed mid-write can leave a hidden
    ``.<name>.*.tmp`` file beside ``path``, never a partial ``path``.
    """
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    if os.name != "posix":  # Windows cannot open a directory for fsync
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location=None) -> Any:
    """Load a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Only tensors and plain Python containers and values are read, never arbitrary pickled
    objects, so a checkpoint from an untrusted source cannot run code.
    """
    return torch.load(path, map_location=map_location, weights_only=True)
