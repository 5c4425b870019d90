"""Output folders a run or tune owns: one lock for the whole run, removed when the run ends.

A run or tune holds an exclusive ``flock`` on ``<out>/.classp-fused.lock`` for as long as it
writes under ``<out>``; it removes the file (still holding the lock) when it ends, normally, on
an error or on Ctrl-C. A killed process leaves the file behind, unlocked: the next run takes it.

Before anything is created, a claim refuses an ``out`` inside a folder another run or tune
holds (a tune's per-configuration folders, a run's cells), and an ``out`` with a held folder
among the folders it would write into. The checks are repeated once the lock is held, so two
runs that start together never both go on.
"""
from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path
from typing import Callable, Iterable

LOCK_NAME = ".classp-fused.lock"
#: A holder that removes the lock file between our open() and flock() makes us try again.
_ATTEMPTS = 3


class FolderError(Exception):
    """A folder cannot be claimed: another run holds it or a folder around it, or it cannot
    be created."""


def _held(folder: Path) -> bool:
    """Whether another open file holds ``folder``'s lock (False when it has no lock file)."""
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # releases the probe's lock, if it took it
    return False


def check_free(out: Path, inner: Iterable[Path], include_out: bool = True) -> None:
    """Raise FolderError if a folder above ``out``, ``out`` itself (``include_out``) or one of
    the ``inner`` folders it will write into is held by another run or tune."""
    try:
        parents = out.resolve().parents
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise FolderError(f"out {out}: cannot resolve it ({exc})") from None
    for folder in parents:
        if _held(folder):
            raise FolderError(f"out {out}: it lies inside {folder}, which another run or tune is"
                              f" writing (it holds {folder / LOCK_NAME}); choose a directory"
                              " outside it")
    if include_out and _held(out):
        raise FolderError(f"out {out}: another run or tune is writing there (it holds"
                          f" {out / LOCK_NAME}); wait for it or choose another directory")
    for folder in sorted(set(inner)):
        if folder != out and _held(folder):
            raise FolderError(f"out {out}: another run or tune is writing into {folder} (it"
                              f" holds {folder / LOCK_NAME}); wait for it or choose another"
                              " directory")


class FolderLock:
    """The held lock of one output folder; ``release`` removes the lock file and lets go."""

    def __init__(self, folder: Path, fd: int, created: list[Path]):
        self.folder = folder
        self.path = folder / LOCK_NAME
        self.created = created
        self._fd = fd

    def release(self, remove_created: bool = False) -> None:
        """Remove the lock file (while still holding it) and close it; with ``remove_created``
        also remove the folders the claim created, where they are empty."""
        if self._fd < 0:
            return
        try:
            if os.path.samestat(os.stat(self.path), os.fstat(self._fd)):
                os.unlink(self.path)
        except OSError:
            pass  # gone or unremovable: it is unlocked once closed either way
        os.close(self._fd)
        self._fd = -1
        if remove_created:
            _remove_empty(self.created)


def _make_folders(out: Path) -> list[Path]:
    """Create ``out`` and its missing parents; return the folders created, outermost first."""
    missing = []
    folder = out
    while not os.path.lexists(folder) and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    created = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
    except OSError as exc:
        _remove_empty(created)
        raise FolderError(f"out {out}: cannot create it ({exc.strerror or exc})") from None
    return created


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (someone else wrote there): keep it and what holds it


def lock_folder(out: Path) -> FolderLock:
    """Create ``out`` if needed and take its lock without waiting; FolderError if held."""
    created = _make_folders(out)
    path = out / LOCK_NAME
    for _ in range(_ATTEMPTS):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            _remove_empty(created)
            raise FolderError(f"out {out}: cannot create its lock file {path}"
                              f" ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.path.samestat(os.stat(path), os.fstat(fd)):
                return FolderLock(out, fd, created)
        except OSError:
            pass
        os.close(fd)
    _remove_empty(created)
    raise FolderError(f"out {out}: another run or tune is writing there (it holds {path});"
                      " wait for it or choose another directory")


def claim_folder(out: Path, inner: Iterable[Path], check: Callable[[], None]) -> FolderLock:
    """Lock ``out`` for a run that writes into the folders ``inner``; ``check`` raises if what
    ``out`` holds forbids the run. Both are checked before anything is created and again
    once the lock is held; a refusal leaves nothing behind."""
    inner = list(inner)
    check_free(out, inner)
    check()
    lock = lock_folder(out)
    try:
        check_free(out, inner, include_out=False)
        check()
    except BaseException:
        lock.release(remove_created=True)
        raise
    return lock
