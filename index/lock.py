"""The data dir's process lock: one process at a time may open a gallery for writing.

``fcntl.flock`` on ``<data_dir>/.lock``, held for as long as the ``Gallery`` is open; the file holds
the holder's pid, for the message a second process gets (``GalleryLockedError``). The kernel drops
the lock when the holder dies, so a restart after kill -9 just works. Read-only readers
(``index.snapshot``) never take it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from ._fs import PRIVATE_FILE
from .records import GalleryLockedError

try:  # POSIX only; without it a second writer process is not detected
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


def acquire_process_lock(data_dir: Path) -> int | None:
    """Lock ``data_dir`` for this process; returns the lock file's descriptor (keep it open).

    Raises ``GalleryLockedError`` when another process holds it, ``OSError`` when the file cannot be
    opened."""
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
    if fcntl is None:  # pragma: no cover
        log.warning("fcntl unavailable: cannot stop a second process from opening %s", data_dir)
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        try:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise GalleryLockedError(
            f"gallery {data_dir} is already open in another process (pid {holder}); only one process "
            "may open a data dir at a time: stop the other one (e.g. a running `cxr-reid serve`) first"
        ) from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release_process_lock(fd: int | None) -> None:
    """Unlock and close what ``acquire_process_lock`` returned (None: nothing to do)."""
    if fd is None:
        return
    with contextlib.suppress(OSError):
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)
