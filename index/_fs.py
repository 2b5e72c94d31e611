"""Crash-safe file writes: temp file in the same directory, fsync, rename, fsync the directory.

A reader (or a process restarted after kill -9 / power loss) then sees either the old file or the new
one, never a torn one. Also here: private modes for gallery files, and telling a full disk apart
from other write failures.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable (POSIX needs the directory itself synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def temp_path_for(path: Path) -> Path:
    """A unique hidden temp name next to ``path`` (same filesystem, so os.replace is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Gallery files hold patient data: readable by the service's user only.
PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) and make it the owner's only; an existing directory
    someone else owns (a mounted volume) is left as it is."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    with contextlib.suppress(PermissionError):
        os.chmod(path, PRIVATE_DIR)


def restrict_file(path: Path) -> None:
    """Make an existing file the owner's only (files from before this rule, SQLite's WAL files)."""
    with contextlib.suppress(FileNotFoundError, PermissionError):
        os.chmod(path, PRIVATE_FILE)


def atomic_write(path: Path, write: Callable[[Path], None], *, sync_dir: bool = True) -> None:
    """Call ``write(tmp)`` to fill a temp file, then fsync it, make it the owner's only and rename
    it over ``path``."""
    tmp = temp_path_for(path)
    try:
        write(tmp)
        os.chmod(tmp, PRIVATE_FILE)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync_dir:
        fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    def _write(tmp: Path) -> None:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE), "wb") as f:
            f.write(data)

    atomic_write(path, _write, sync_dir=sync_dir)


def remove_stale_temps(directory: Path, name: str) -> None:
    """Delete temp files a crashed writer left behind for ``name``."""
    for p in directory.glob(f".{name}.*.tmp"):
        with contextlib.suppress(OSError):
            p.unlink()


def is_disk_full(exc: BaseException | None) -> bool:
    """ENOSPC from a file write, or SQLite's "database or disk is full", however wrapped."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
