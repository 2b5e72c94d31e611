"""The gallery: enrolled radiographs, their identity vectors, and search over them.

Storage (all under ``data_dir``):
- ``gallery.sqlite``: the source of truth. Metadata and the vectors themselves (float32 BLOBs), the
  model id per row and in the meta table, a schema version, and a generation counter that every
  change to the vector set bumps in the same transaction. WAL + ``synchronous=FULL``: when ``add``
  returns, the rows are on disk and survive kill -9 or power loss.
- ``images/<sha256[:2]>/<sha256>``: uploaded originals, content-addressed, written with temp file +
  fsync + rename *before* the row that references them commits; a failed ``add`` removes the files
  it created, a delete removes files no remaining row references (after the commit).
- ``faiss.index`` + ``faiss.index.json``: a cache. The index lives in memory and is updated in place
  on add/delete; it is written (atomically, tagged with generation, row count, max id, id sum, model
  id, dim, factory and the file's own sha256) by ``save()``, ``close()``, every ``autosave_seconds``
  after a write, and after a rebuild. On open a missing, corrupt or stale file (tag differs from
  SQLite) is rebuilt from SQLite, so a crash never loses anything, it only costs a rebuild.
- ``.lock``: ``fcntl.flock`` held while open; a second process gets ``GalleryLockedError``. The kernel
  drops the lock when the holder dies, so a restart after kill -9 just works.

Integrity on open (``Store``): a missing or empty ``gallery.sqlite`` next to stored originals or a
FAISS file (a mis-mounted or lost volume) raises ``GalleryIntegrityError`` instead of starting an
empty gallery over them, unless ``init=True``; so does a database failing ``PRAGMA quick_check``.
Stored originals no row references (a crash between the blob write and the commit) are removed.

Concurrency (one process, many threads, e.g. FastAPI's threadpool): writers are serialised by one
RLock (``Store.write_lock``) that covers the SQLite write transaction, blob files and FAISS mutation.
Readers take no gallery lock: each thread reads SQLite through its own connection (WAL snapshots of
committed data) and FAISS under a shared reader-writer lock that a mutation takes exclusively for the
few microseconds of ``add_with_ids``/``remove_ids``. Writes commit to SQLite first and then touch
FAISS, so a search racing a write may miss a just-added image or see an id whose row was just deleted;
such ids are dropped when the records are fetched, and every hit is re-checked against the requested
collection.

Index layout: ``index_factory="auto"`` (the default) serves exact Flat while the gallery is small and
IVF-Flat above ``auto_flat_max`` images (figures in ``index/faiss_index.py``, from bench/search.py).
Growing into a bigger layout rebuilds the index in a background thread (``_rebuild``: SQLite snapshot,
build without locks, replay of the writes made meanwhile, atomic swap, save); searches use the
current index until the swap. An explicit factory string behaves as it always has.

Deletes: Flat and IVF remove ids from FAISS; HNSW cannot, so deleted ids are tombstoned and filtered
out of searches, and the index is compacted (rebuilt from SQLite) when tombstones pass 10% of it and
before every save.

Reindex (new embedding model) is batched and resumable: new vectors go to a staging table, one
committed batch at a time, then a single transaction swaps every row's vector and model id and the
gallery's model id. An interrupted reindex resumes where it stopped when called again with the same
model id.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from . import alerts as alert_sql
from ._fs import PRIVATE_FILE, make_private_dir
from .alerts import ALERT_STATES, RESOLVED_STATES, AlertRecord, NewAlert
from .faiss_index import (
    AUTO,
    AUTO_FLAT_MAX,
    AllowedIds,
    PairLimitError,
    VectorIndex,
    _make_base,
    auto_layout,
    layout_rank,
    min_training_points,
    pairs_above,
    validate_factory,
)
from .records import (
    METADATA_TEXT_FIELDS,
    DuplicatePair,
    GalleryError,
    GalleryFullError,
    GalleryLockedError,
    GalleryModelMismatchError,
    GalleryValidationError,
    ImageRecord,
    Match,
    NewImage,
)
from .store import Store

try:  # POSIX only; without it a second writer process is not detected
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

# The record and error types are imported above for this module's own use; the package
# (index/__init__.py) is where they are exported, from .records.
__all__ = ["Gallery", "cluster_pairs"]

log = logging.getLogger(__name__)

INDEX_FILE = "faiss.index"
LOCK_FILE = ".lock"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_MIN_NORM = 1e-6
_STR_FIELDS = ("source_path", *METADATA_TEXT_FIELDS)

# callable(n_done, n_total) or a tqdm-like object with update(n) and total
ProgressLike = Any


class _RebuildCancelledError(Exception):
    """A background rebuild stopped because the gallery is closing."""


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")  # noqa: UP017 (py3.10)


def _acquire_process_lock(data_dir: Path) -> int | None:
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


def _release_process_lock(fd: int | None) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC from a file write, or SQLite's "database or disk is full", however wrapped."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _progress_reporter(progress: ProgressLike | None) -> Callable[[int, int], None]:
    """Accept ``callable(n_done, n_total)`` or a tqdm-like object (``update(n)``, ``total``)."""
    if progress is None:
        return lambda done, total: None
    if hasattr(progress, "update") and hasattr(progress, "total"):
        last = [0]

        def _tqdm(done: int, total: int) -> None:
            if progress.total != total:
                with contextlib.suppress(Exception):
                    progress.total = total
                    if hasattr(progress, "refresh"):
                        progress.refresh()
            if done > last[0]:
                progress.update(done - last[0])
                last[0] = done

        return _tqdm
    if callable(progress):
        return progress
    raise GalleryValidationError("progress must be a callable(n_done, n_total) or a tqdm-like object")


class Gallery:
    """Enrolled images + vectors for one embedding model; see the module docstring for the design."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        dim: int,
        model_id: str,
        index_factory: str = AUTO,
        nprobe: int | None = None,
        ef_search: int = 64,
        auto_flat_max: int = AUTO_FLAT_MAX,
        allow_model_mismatch: bool = False,
        autosave_seconds: float | None = 300.0,
        init: bool = False,
    ) -> None:
        if not isinstance(dim, int | np.integer) or int(dim) <= 0:
            raise GalleryValidationError(f"dim must be a positive integer, got {dim!r}")
        if not isinstance(model_id, str) or not model_id.strip():
            raise GalleryValidationError("model_id must be a non-empty string")
        if (nprobe is not None and int(nprobe) < 1) or int(ef_search) < 1:
            raise GalleryValidationError("nprobe and ef_search must be >= 1")
        self.dim = int(dim)
        self.model_id = model_id
        self.index_factory = validate_factory(self.dim, index_factory)
        # None: 16 for an explicit factory; with "auto" each layout's own (faiss_index.auto_nprobe)
        default_nprobe = None if self.index_factory == AUTO else 16
        self.nprobe = int(nprobe) if nprobe is not None else default_nprobe
        self.ef_search = int(ef_search)
        self.auto_flat_max = int(auto_flat_max)
        self.autosave_seconds = autosave_seconds
        self.data_dir = Path(data_dir).expanduser().resolve()
        self._index_path = self.data_dir / INDEX_FILE
        self._closed = True
        self._mismatch = False
        self._cache_lock = threading.Lock()
        self._cache_version = 0
        self._allowed_cache: dict[str, AllowedIds] = {}
        self._saved_generation: int | None = None
        self._last_save = time.monotonic()
        # background rebuild ("auto"): the thread, and the FAISS changes made while it builds
        self._rebuild_thread: threading.Thread | None = None
        self._rebuild_changes: list[Callable[[VectorIndex], None]] | None = None
        self._rebuild_cancel = threading.Event()
        try:
            make_private_dir(self.data_dir)
            self._lock_fd = _acquire_process_lock(self.data_dir)
        except OSError as exc:
            raise GalleryError(f"cannot open gallery data dir {self.data_dir}: {exc}") from exc
        self._store: Store | None = None
        try:
            self._store = Store(self.data_dir, init=init, other_data=[self._index_path])
            self._wlock = self._store.write_lock
            self._stored_dim = self._check_model(allow_model_mismatch)
            self._closed = False
            with self._wlock:
                self._store.remove_orphan_blobs()
                self._index = self._load_or_build()
                self._maybe_rebuild_in_background()
        except BaseException:
            self._closed = True
            if self._store is not None:
                self._store.close()
            _release_process_lock(self._lock_fd)
            raise
        log.info(
            "gallery %s open: %d images, model %s, index %s",
            self.data_dir,
            len(self),
            self.stored_model_id,
            self._index.effective_factory,
        )

    # ---------------------------------------------------------------- open / close
    def _check_model(self, allow_mismatch: bool) -> int:
        """Returns the dim of the stored vectors; raises when they come from another model."""
        store = self._store
        stored_model = store.meta_get("model_id")
        stored_dim = int(store.meta_get("dim") or 0)
        count = store.count()
        if stored_model is None or (count == 0 and (stored_model, stored_dim) != (self.model_id, self.dim)):
            if stored_model is not None:
                log.info(
                    "empty gallery %s switches from model %s to %s",
                    self.data_dir,
                    stored_model,
                    self.model_id,
                )
            with store.write_txn() as conn:
                store.meta_set(conn, "model_id", self.model_id)
                store.meta_set(conn, "dim", str(self.dim))
            return self.dim
        if stored_model != self.model_id:
            msg = (
                f"gallery {self.data_dir} holds {count} vectors of model {stored_model!r} (dim "
                f"{stored_dim}), not {self.model_id!r} (dim {self.dim}): run `cxr-reid reindex` to "
                "re-embed them with the new model"
            )
            if not allow_mismatch:
                raise GalleryModelMismatchError(msg)
            log.warning(
                "%s; opened anyway (allow_model_mismatch): search and add are refused until "
                "reindex() completes",
                msg,
            )
            self._mismatch = True
            return stored_dim
        if stored_dim != self.dim:
            raise GalleryError(
                f"gallery {self.data_dir} stores {stored_dim}-d vectors for model "
                f"{stored_model!r} but was opened with dim={self.dim}"
            )
        return stored_dim

    def _tag(self) -> dict:
        """What a saved FAISS file must match to be reused (call with the write lock held)."""
        store = self._store
        return {
            "generation": int(store.meta_get("generation") or 0),
            "instance_id": store.meta_get("instance_id"),
            "model_id": store.meta_get("model_id"),
            "dim": self._stored_dim,
            **store.id_stats(),
        }

    def _training_need(self) -> int:
        if self.index_factory in ("Flat", AUTO):  # auto never builds what it cannot train
            return 0
        return min_training_points(_make_base(self._stored_dim, self.index_factory), self.index_factory)

    def _load_or_build(self) -> VectorIndex:
        tag = self._tag()
        idx = VectorIndex.load(
            self._index_path, tag, factory=self.index_factory, nprobe=self.nprobe, ef_search=self.ef_search
        )
        if idx is not None and idx.is_fallback and tag["count"] >= self._training_need():
            log.info("gallery now has enough vectors to train %s: rebuilding", self.index_factory)
            idx = None
        if idx is not None:
            if idx.is_fallback and tag["count"]:
                log.warning(
                    "index_factory %r cannot train on %d vectors yet: using an exact Flat index",
                    self.index_factory,
                    tag["count"],
                )
            self._saved_generation = tag["generation"]
            return idx
        idx = self._build()
        self._save_index(idx)
        return idx

    def _layout(self, count: int) -> str:
        """What to build for ``count`` vectors: the factory asked for, or the pick of "auto" by size."""
        return auto_layout(count, self.auto_flat_max) if self.index_factory == AUTO else self.index_factory

    def _new_index(
        self,
        count: int,
        train_sample: Callable[[int], np.ndarray],
        chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    ) -> VectorIndex:
        """A FAISS index of this gallery's settings and layout for ``count`` vectors, filled from
        ``chunks`` (the open-time build and the background rebuild differ only in where those come from)."""
        return VectorIndex.build(
            self._stored_dim,
            self.index_factory,
            nprobe=self.nprobe,
            ef_search=self.ef_search,
            count=count,
            train_sample=train_sample,
            chunks=chunks,
            layout=self._layout(count),
        )

    def _build(self) -> VectorIndex:
        """A fresh FAISS index from the vectors in SQLite (call with the write lock held)."""
        store = self._store
        count = store.count()
        t0 = time.perf_counter()
        idx = self._new_index(count, store.sample_vectors, store.iter_vectors)
        log.info(
            "built FAISS index %s over %d vectors in %.2fs",
            idx.effective_factory,
            count,
            time.perf_counter() - t0,
        )
        return idx

    def _save_index(self, idx: VectorIndex) -> None:
        tag = self._tag()
        idx.save(self._index_path, tag)
        self._saved_generation = tag["generation"]
        self._last_save = time.monotonic()

    def save(self) -> None:
        """Persist the FAISS index now (compacting tombstones / training a fallback index first)."""
        with self._wlock:
            self._check_open()
            idx = self._index
            if idx.tombstone_count or (idx.is_fallback and len(self) >= self._training_need()):
                idx = self._index = self._build()
            self._save_index(idx)

    def close(self) -> None:
        """Save the FAISS index if it changed, close SQLite, release the data-dir lock. Idempotent.

        A background rebuild is cancelled first (it stops between chunks; a k-means already
        training finishes), and waited for: it reads SQLite through the store closed here."""
        self._rebuild_cancel.set()
        thread = self._rebuild_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._wlock:
            if self._closed:
                return
            try:
                if self._dirty():
                    self.save()
            except Exception:  # the index is only a cache: the next open rebuilds it
                log.exception("could not save the FAISS index of %s on close", self.data_dir)
            finally:
                self._closed = True
                self._store.close()
                _release_process_lock(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _dirty(self) -> bool:
        return int(self._store.meta_get("generation") or 0) != self._saved_generation

    def _after_write(self) -> None:
        """Compact tombstones when they pile up; autosave now and then (write lock held)."""
        if self._index.needs_compaction:
            log.info("compacting FAISS index (%d tombstones)", self._index.tombstone_count)
            self._index = self._build()
        if (
            self.autosave_seconds is not None
            and self._dirty()
            and time.monotonic() - self._last_save >= self.autosave_seconds
        ):
            try:
                self.save()
            except Exception:
                log.exception("autosave of the FAISS index failed (SQLite still has everything)")
        self._maybe_rebuild_in_background()

    # ---------------------------------------------------------------- background rebuild ("auto")
    @property
    def index_rebuilding(self) -> bool:
        """A background rebuild into a bigger layout is running (searches use the current index)."""
        thread = self._rebuild_thread
        return thread is not None and thread.is_alive()

    def wait_for_rebuild(self, timeout: float | None = None) -> bool:
        """Wait for a running background rebuild; True when none is running any more."""
        thread = self._rebuild_thread
        if thread is not None:
            thread.join(timeout)
        return not self.index_rebuilding

    def _maybe_rebuild_in_background(self) -> None:
        """With "auto": start a rebuild into the layout the gallery's size now calls for, when that is
        bigger than the one in use (write lock held). Never downwards: after deletes the gallery keeps
        its layout until it is next opened, so a size near a boundary does not rebuild back and forth."""
        if self.index_factory != AUTO or self._closed or self._mismatch or self.index_rebuilding:
            return
        current = self._index
        if layout_rank(self._layout(current.ntotal)) <= layout_rank(current.effective_factory):
            return
        self._rebuild_cancel.clear()
        self._rebuild_thread = threading.Thread(
            target=self._rebuild, args=(current,), name="cxr-reid-index-rebuild", daemon=True
        )
        self._rebuild_thread.start()

    def _rebuild(self, current: VectorIndex) -> None:
        """The background rebuild (its own thread). Build-from-snapshot-then-replay, not "rebuild
        until the generation stands still", which a steady stream of enrolments could starve:

        1. under the write lock, open a SQLite read transaction (a WAL snapshot, pinned by its first
           SELECT) and start recording every FAISS change (``_faiss_update`` appends it); writers
           commit under that same lock, so each write is either in the snapshot or recorded;
        2. without any gallery lock, train and fill the new index from the snapshot, while searches
           and writes go on against ``current``;
        3. under the write lock again, replay the recorded changes on the new index (adds and removes
           in commit order), swap it in and save it with the tag of the generation it now matches.

        If the index was replaced meanwhile (a reindex, a compaction, a failed update's rebuild) the
        new one is dropped: it was built from vectors that no longer hold.
        """
        store = self._store
        t0 = time.perf_counter()
        try:
            with contextlib.ExitStack() as stack:
                with self._wlock:
                    if self._closed or self._index is not current:
                        return
                    conn = stack.enter_context(store.read_txn())
                    count = int(conn.execute("SELECT COUNT(*) FROM images").fetchone()[0])
                    self._rebuild_changes = []
                log.info(
                    "rebuilding the FAISS index as %s over %d vectors in the background",
                    self._layout(count),
                    count,
                )
                idx = self._new_index(
                    count,
                    lambda n: store.sample_vectors(n, conn=conn),
                    lambda: self._until_cancelled(store.iter_vectors(conn=conn)),
                )
            with self._wlock:
                changes, self._rebuild_changes = self._rebuild_changes or [], None
                if self._closed or self._rebuild_cancel.is_set() or self._index is not current:
                    log.info("background rebuild dropped: the gallery closed or its index was replaced")
                    return
                for change in changes:
                    change(idx)
                self._index = idx
                self._save_index(idx)
            log.info(
                "FAISS index is now %s (%d vectors, %d changes replayed), rebuilt in %.1fs",
                idx.effective_factory,
                idx.ntotal,
                len(changes),
                time.perf_counter() - t0,
            )
        except _RebuildCancelledError:
            log.info("background rebuild of the FAISS index cancelled: the gallery is closing")
        except Exception:
            log.exception("background rebuild of the FAISS index failed; the current index stays in use")
        finally:
            with self._wlock:
                self._rebuild_changes = None

    def _until_cancelled(
        self, chunks: Iterable[tuple[np.ndarray, np.ndarray]]
    ) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        for chunk in chunks:
            if self._rebuild_cancel.is_set():
                raise _RebuildCancelledError
            yield chunk

    # ---------------------------------------------------------------- properties
    @property
    def stored_model_id(self) -> str:
        """Model id of the vectors on disk (differs from ``model_id`` only before a reindex)."""
        return self._store.meta_get("model_id") or self.model_id

    @property
    def effective_index_factory(self) -> str:
        """The FAISS layout in use: ``index_factory``, or "Flat" while an IVF index cannot train yet,
        or what "auto" picked for the gallery's size."""
        return self._index.effective_factory

    def __len__(self) -> int:
        self._check_open()
        return self._store.count()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._store.count()} images"
        return f"Gallery({str(self.data_dir)!r}, model_id={self.model_id!r}, {state})"

    def _check_open(self) -> None:
        if self._closed:
            raise GalleryError(f"gallery {self.data_dir} is closed")

    def _check_model_matches(self) -> None:
        if self._mismatch:
            raise GalleryModelMismatchError(
                f"gallery {self.data_dir} holds vectors of model {self.stored_model_id!r}, not "
                f"{self.model_id!r}: run `cxr-reid reindex` first"
            )

    # ---------------------------------------------------------------- validation
    def _vectors(self, vectors: np.ndarray, *, what: str = "vectors") -> np.ndarray:
        """(n, dim) finite, non-zero -> float32 unit rows. Raises GalleryValidationError otherwise."""
        try:
            x = np.asarray(vectors)
        except Exception as exc:
            raise GalleryValidationError(f"{what} is not an array: {exc}") from exc
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise GalleryValidationError(f"{what} must have shape (n, {self.dim}), got {x.shape}")
        if x.dtype.kind not in "fiu":
            raise GalleryValidationError(f"{what} must be real numbers, got dtype {x.dtype}")
        x = x.astype(np.float64)
        if not np.isfinite(x).all():
            bad = np.where(~np.isfinite(x).all(axis=1))[0]
            raise GalleryValidationError(f"{what} has non-finite values in rows {bad[:10].tolist()}")
        norms = np.linalg.norm(x, axis=1)
        if (norms < _MIN_NORM).any():
            bad = np.where(norms < _MIN_NORM)[0]
            raise GalleryValidationError(f"{what} has zero-length rows {bad[:10].tolist()}")
        return (x / norms[:, None]).astype(np.float32)

    def _query(self, vector: np.ndarray) -> np.ndarray:
        x = np.asarray(vector)
        if x.ndim == 1:
            x = x[None, :]
        if x.shape[0] != 1:
            raise GalleryValidationError(f"search takes one vector, got shape {np.shape(vector)}")
        return self._vectors(x, what="query vector")

    @staticmethod
    def _opt_str(img: NewImage, name: str) -> str | None:
        v = getattr(img, name)
        if v is not None and not isinstance(v, str):
            raise GalleryValidationError(f"{name} must be a string or None, got {type(v).__name__}")
        return v

    def _prepare(self, img: NewImage, i: int) -> dict:
        """Check one NewImage and turn it into a row dict (blob not yet written)."""
        if not isinstance(img, NewImage):
            raise GalleryValidationError(f"images[{i}] is a {type(img).__name__}, not a NewImage")
        pid = img.patient_id
        if pid is not None and (not isinstance(pid, str) or not pid.strip()):
            raise GalleryValidationError(f"images[{i}].patient_id must be a non-empty string or None")
        if not isinstance(img.collection, str) or not img.collection.strip():
            raise GalleryValidationError(f"images[{i}].collection must be a non-empty string")
        row: dict[str, Any] = {"patient_id": pid, "collection": img.collection}
        for name in _STR_FIELDS:
            row[name] = self._opt_str(img, name)
        tags = img.tags if img.tags is not None else {}
        if not isinstance(tags, dict) or not all(isinstance(k, str) for k in tags):
            raise GalleryValidationError(f"images[{i}].tags must be a dict with string keys")
        row["tags"] = {
            k: v if isinstance(v, str | int | float | bool) or v is None else str(v) for k, v in tags.items()
        }
        sha = img.sha256
        if sha is not None:
            if not isinstance(sha, str) or not _SHA256_RE.match(sha.lower()):
                raise GalleryValidationError(f"images[{i}].sha256 must be 64 hex digits")
            sha = sha.lower()
        blob = img.blob
        row["blob"] = None
        row["blob_sha256"] = None
        if blob is not None:
            if not isinstance(blob, bytes | bytearray | memoryview):
                raise GalleryValidationError(f"images[{i}].blob must be bytes")
            blob = bytes(blob)
            if not blob:
                raise GalleryValidationError(f"images[{i}].blob is empty")
            digest = hashlib.sha256(blob).hexdigest()
            row["blob"] = blob
            row["blob_sha256"] = digest
            # `sha256` names what the client sent; the stored blob may be a de-identified copy of it
            sha = sha or digest
        row["sha256"] = sha
        return row

    # ---------------------------------------------------------------- writes
    def add(self, vectors: np.ndarray, images: Sequence[NewImage]) -> list[ImageRecord]:
        """Enrol images with their vectors. All or nothing, and durable once it returns."""
        return self.add_with_alerts(vectors, images)[0]

    def add_with_alerts(
        self,
        vectors: np.ndarray,
        images: Sequence[NewImage],
        alerts: Sequence[NewAlert | None] | None = None,
    ) -> tuple[list[ImageRecord], list[AlertRecord | None]]:
        """``add``, storing ``alerts[i]`` (None: no alert) for image i in the same transaction: an
        alert exists only for an enrolled image. Returns the records and the stored alerts."""
        self._check_open()
        images = list(images)
        x = self._vectors(vectors)
        if x.shape[0] != len(images):
            raise GalleryValidationError(f"{x.shape[0]} vectors for {len(images)} images")
        new_alerts = list(alerts) if alerts is not None else [None] * len(images)
        if len(new_alerts) != len(images):
            raise GalleryValidationError(f"{len(new_alerts)} alerts for {len(images)} images")
        rows = [self._prepare(img, i) for i, img in enumerate(images)]
        if not rows:
            return [], []
        store = self._store
        with self._wlock:
            self._check_open()
            self._check_model_matches()
            created: list[str] = []
            created_at = _now_iso()
            try:
                for row in rows:
                    if row["blob"] is not None:
                        sha, new = store.write_blob(row["blob"], row["blob_sha256"])
                        if new:
                            created.append(sha)
                with store.write_txn() as conn:
                    ids = [self._insert_row(conn, row, x[j], created_at) for j, row in enumerate(rows)]
                    stored_alerts = [
                        None
                        if alert is None
                        else alert_sql.insert(
                            conn,
                            alert,
                            image_id=iid,
                            collection=row["collection"],
                            patient_id=row["patient_id"],
                            created_at=created_at,
                        )
                        for iid, row, alert in zip(ids, rows, new_alerts, strict=True)
                    ]
                    store.bump_generation(conn)
            except BaseException as exc:
                # rolled back: drop the files this call wrote (unless a committed row uses them)
                store.remove_blobs_if_unreferenced(set(created))
                if _disk_full(exc):
                    raise GalleryFullError(
                        f"the disk of {self.data_dir} is full; nothing of this request was kept: free "
                        "space or move the data dir, then send it again"
                    ) from exc
                if isinstance(exc, Exception) and not isinstance(exc, GalleryError):
                    raise GalleryError(f"could not add {len(rows)} images: {exc}") from exc
                raise
            self._faiss_update(lambda idx: idx.add(x, np.asarray(ids, dtype=np.int64)))
            self._invalidate({row["collection"] for row in rows})
            self._after_write()
        records = [
            ImageRecord(
                image_id=iid,
                model_id=self.model_id,
                created_at=created_at,
                stored_path=str(store.blob_path(row["blob_sha256"])) if row["blob_sha256"] else None,
                patient_id=row["patient_id"],
                collection=row["collection"],
                source_path=row["source_path"],
                sha256=row["sha256"],
                sop_instance_uid=row["sop_instance_uid"],
                study_instance_uid=row["study_instance_uid"],
                view=row["view"],
                study_date=row["study_date"],
                split=row["split"],
                tags=dict(row["tags"]),
            )
            for iid, row in zip(ids, rows, strict=True)
        ]
        return records, stored_alerts

    def _insert_row(self, conn: Any, row: dict, vector: np.ndarray, created_at: str) -> int:
        return self._store.insert_image(conn, row, vector, self.model_id, created_at)

    def _faiss_update(self, change: Callable[[VectorIndex], None]) -> None:
        """Apply a committed change to FAISS; if that fails, rebuild it from SQLite (the truth).
        During a background rebuild the change is also kept, to be replayed on the new index."""
        try:
            change(self._index)
        except Exception:
            log.exception("FAISS update failed after the SQLite commit; rebuilding the index from SQLite")
            self._index = self._build()
        if self._rebuild_changes is not None:
            self._rebuild_changes.append(change)

    def _invalidate(self, collections: Iterable[str] | None = None) -> None:
        with self._cache_lock:
            self._cache_version += 1
            if collections is None:
                self._allowed_cache.clear()
            else:
                for c in collections:
                    self._allowed_cache.pop(c, None)

    def _delete_where(self, where: str, args: Sequence) -> int:
        store = self._store
        with self._wlock:
            self._check_open()
            with store.write_txn() as conn:
                ids, collections, shas = store.delete_rows(conn, where, args)
                if ids:
                    store.bump_generation(conn)
            if not ids:
                return 0
            self._faiss_update(lambda idx: idx.remove(ids))
            self._invalidate(collections)
            store.remove_blobs_if_unreferenced(shas)
            self._after_write()
        return len(ids)

    def delete_image(self, image_id: int) -> bool:
        """Delete one image (row, vector, stored original if nothing else uses it)."""
        self._check_open()
        return self._delete_where("image_id = ?", [int(image_id)]) > 0

    def delete_patient(self, patient_id: str, *, collection: str | None = None) -> int:
        """Delete every image of a patient (in one collection, or all when collection is None)."""
        self._check_open()
        if not isinstance(patient_id, str) or not patient_id:
            raise GalleryValidationError("patient_id must be a non-empty string")
        if collection is None:
            return self._delete_where("patient_id = ?", [patient_id])
        return self._delete_where("patient_id = ? AND collection = ?", [patient_id, collection])

    # ---------------------------------------------------------------- reads
    def get(self, image_id: int) -> ImageRecord | None:
        self._check_open()
        return self._store.get(int(image_id))

    def get_vector(self, image_id: int) -> np.ndarray | None:
        """The stored unit vector (of ``stored_model_id``), float32 (dim,)."""
        self._check_open()
        return self._store.get_vector(int(image_id))

    def get_vectors(self, image_ids: Iterable[int]) -> dict[int, np.ndarray]:
        """Stored unit vectors by id, in a few queries; ids not found (deleted) are left out."""
        self._check_open()
        return self._store.get_vectors(list(image_ids))

    def image_ids(self, *, collection: str | None = "default") -> np.ndarray:
        """Ids of every image of a collection (None: all), ascending; cached between writes."""
        self._check_open()
        if collection is None:
            return self._store.ids(None)
        return np.asarray(self._allowed(collection).ids, dtype=np.int64)

    def list_images(
        self,
        *,
        patient_id: str | None = None,
        collection: str | None = None,
        offset: int = 0,
        limit: int = 100,
    ) -> tuple[list[ImageRecord], int]:
        """A page of records ordered by image_id, and the total matching count."""
        self._check_open()
        if int(offset) < 0 or int(limit) < 0:
            raise GalleryValidationError("offset and limit must be >= 0")
        return self._store.list_images(patient_id, collection, int(offset), int(limit))

    def collections(self) -> dict[str, int]:
        """Collection name -> image count."""
        self._check_open()
        return self._store.collection_counts()

    def find_by_sha256(self, sha256: str, *, collection: str | None = "default") -> ImageRecord | None:
        """The first image with this original's sha256 (collection=None: any collection)."""
        self._check_open()
        return self._store.find_by_sha256(str(sha256).lower(), collection)

    def find_by_sop_instance_uid(self, uid: str, *, collection: str | None = "default") -> ImageRecord | None:
        """The first image with this DICOM SOPInstanceUID (collection=None: any collection): what
        STOW-RS checks so that a re-sent instance is not enrolled twice."""
        self._check_open()
        return self._store.find_by_sop_instance_uid(str(uid).strip(), collection)

    def patient_images(
        self, patient_id: str, *, collection: str | None = "default"
    ) -> tuple[list[ImageRecord], np.ndarray]:
        """A patient's records and their vectors (m, dim), for scoring "is this radiograph patient X?"."""
        self._check_open()
        self._check_model_matches()
        return self._store.records_with_vectors(patient_id, collection, self._stored_dim)

    def labelled_vectors(self, *, collection: str | None = None) -> tuple[list[tuple[str, str]], np.ndarray]:
        """(collection, patient id) and vector of every image filed under a patient (collection=None:
        all). Collections are separate namespaces, so a patient is the pair, not the id alone."""
        self._check_open()
        self._check_model_matches()
        return self._store.labelled_vectors(collection, self._stored_dim)

    # ---------------------------------------------------------------- site calibration
    def save_calibration(self, calibration: dict[str, Any]) -> int:
        """Keep ``calibration`` (a JSON-able dict) as this model's site calibration; returns its id."""
        self._check_open()
        return self._store.save_calibration(self.model_id, calibration, _now_iso())

    def site_calibration(self) -> dict[str, Any] | None:
        """The site calibration in force for this gallery's model, with ``calibration_id`` and
        ``stored_at`` added; None when there is none (the model's own calibration applies)."""
        self._check_open()
        found = self._store.active_calibration(self.model_id)
        if found is None:
            return None
        calibration_id, stored_at, body = found
        return {**body, "calibration_id": calibration_id, "stored_at": stored_at}

    def clear_site_calibration(self) -> bool:
        """Stop using the site calibration (kept as history); True when one was in force."""
        self._check_open()
        return self._store.deactivate_calibrations(self.model_id) > 0

    # ---------------------------------------------------------------- wrong-patient alerts
    def get_alert(self, alert_id: int) -> AlertRecord | None:
        self._check_open()
        return alert_sql.get(self._store.reader(), int(alert_id))

    def list_alerts(
        self, *, state: str | None = None, collection: str | None = None, offset: int = 0, limit: int = 100
    ) -> tuple[list[AlertRecord], int]:
        """A page of alerts, newest first, and the total matching (state / collection None: any)."""
        self._check_open()
        if int(offset) < 0 or int(limit) < 0:
            raise GalleryValidationError("offset and limit must be >= 0")
        if state is not None and state not in ALERT_STATES:
            raise GalleryValidationError(f"state must be one of {', '.join(ALERT_STATES)}")
        with self._store.read_txn() as conn:
            return alert_sql.page(conn, state=state, collection=collection, offset=offset, limit=limit)

    def count_alerts(self, state: str | None = "open") -> int:
        self._check_open()
        return alert_sql.count(self._store.reader(), state)

    def resolve_alert(
        self,
        alert_id: int,
        *,
        state: str,
        resolved_by: str,
        note: str | None = None,
        new_patient_id: str | None = None,
    ) -> AlertRecord | None:
        """Resolve an open alert as ``confirmed``, ``dismissed`` or ``relabelled``; a relabel files
        its image under ``new_patient_id`` in the same transaction. None for an unknown alert;
        ``AlertNotOpenError`` (nothing changed) when it was resolved or its image deleted before."""
        self._check_open()
        if state not in RESOLVED_STATES:
            raise GalleryValidationError(f"state must be one of {', '.join(RESOLVED_STATES)}")
        if (state == "relabelled") != (new_patient_id is not None):
            raise GalleryValidationError("new_patient_id is given with state 'relabelled', and only then")
        with self._wlock:
            self._check_open()
            with self._store.write_txn() as conn:
                resolved = alert_sql.resolve(
                    conn,
                    alert_id,
                    state=state,
                    resolved_by=resolved_by,
                    resolved_at=_now_iso(),
                    note=note,
                    new_patient_id=new_patient_id,
                )
                if resolved is not None and new_patient_id is not None:
                    self._relabel(conn, resolved.image_id, new_patient_id)
        return resolved

    def set_patient_id(self, image_id: int, patient_id: str | None) -> ImageRecord | None:
        """File an image under another patient (None: unknown); None when there is no such image."""
        self._check_open()
        with self._wlock:
            self._check_open()
            with self._store.write_txn() as conn:
                if not self._relabel(conn, image_id, patient_id):
                    return None
        return self.get(image_id)

    def _relabel(self, conn: Any, image_id: int, patient_id: str | None) -> bool:
        if patient_id is not None and (not isinstance(patient_id, str) or not patient_id.strip()):
            raise GalleryValidationError("patient_id must be a non-empty string or None")
        cur = conn.execute("UPDATE images SET patient_id = ? WHERE image_id = ?", (patient_id, int(image_id)))
        if cur.rowcount:
            # labels decide conflicts: results cached per generation (duplicates) must not outlive it
            self._store.bump_generation(conn)
        return bool(cur.rowcount)

    def _allowed(self, collection: str) -> AllowedIds:
        with self._cache_lock:
            hit = self._allowed_cache.get(collection)
            version = self._cache_version
        if hit is not None:
            return hit
        allowed = AllowedIds(self._store.ids(collection))
        with self._cache_lock:
            if self._cache_version == version:  # no write slipped in while we read SQLite
                self._allowed_cache[collection] = allowed
        return allowed

    def search(
        self,
        vector: np.ndarray,
        *,
        k: int = 10,
        collection: str | None = "default",
        threshold: float | None = None,
        exclude_ids: Iterable[int] = (),
    ) -> list[Match]:
        """The k most similar images, best first (score = cosine similarity).

        collection=None searches every collection; threshold keeps score >= threshold; exclude_ids are
        never returned (e.g. the query image itself).
        """
        self._check_open()
        self._check_model_matches()
        q = self._query(vector)
        k = int(k)
        if k < 0:
            raise GalleryValidationError("k must be >= 0")
        exclude = {int(i) for i in exclude_ids}
        if k == 0:
            return []
        idx = self._index
        allowed = None
        if collection is not None:
            allowed = self._allowed(collection)
            if len(allowed) == 0:
                return []
            if len(allowed) >= idx.ntotal:  # the collection is everything: no selector needed
                allowed = None
        scores, ids = idx.search(q, k + len(exclude), allowed)
        keep = [
            (int(i), float(s))
            for s, i in zip(scores, ids, strict=True)
            if int(i) not in exclude and (threshold is None or s >= threshold)
        ]
        records = self._store.get_many([i for i, _ in keep])
        out = []
        for i, s in keep:
            rec = records.get(i)
            if rec is None or (collection is not None and rec.collection != collection):
                continue  # deleted meanwhile / added to another collection meanwhile
            out.append(Match(record=rec, score=s))
            if len(out) == k:
                break
        return out

    def duplicates(
        self,
        threshold: float | None = None,
        *,
        collection: str | None = "default",
        chunk: int = 2048,
        row_thresholds: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
        max_pairs: int | None = None,
    ) -> list[DuplicatePair]:
        """Every pair of images with similarity >= threshold, each pair once (a < b), best first.

        ``row_thresholds(ids, vectors)`` instead gives every image a threshold of its own, and a pair
        counts when its score reaches the threshold of either image (a caller whose decision score
        is not the cosine passes, per image, the lowest cosine at which it could decide "same").
        Exact (range search over a flat copy of the collection's vectors); O(n^2) work and as many
        pairs as the thresholds let through, so keep them high on big galleries. ``max_pairs`` bounds
        the memory: more candidate pairs than that raise ``GalleryValidationError``.
        """
        self._check_open()
        store = self._store
        with store.read_txn() as conn:
            parts = list(store.iter_vectors(collection, conn=conn))
        if not parts:
            return []
        ids = np.concatenate([p[0] for p in parts])
        X = np.ascontiguousarray(np.concatenate([p[1] for p in parts]), dtype=np.float32)
        n = ids.shape[0]
        if n < 2:
            return []
        if row_thresholds is not None:
            limits = np.asarray(row_thresholds(ids, X), dtype=np.float32).reshape(n)
        elif threshold is not None:
            limits = np.full(n, threshold, dtype=np.float32)
        else:
            raise GalleryValidationError("give a threshold or row_thresholds")
        try:
            ia, ib, sc = pairs_above(X, limits, chunk=chunk, max_pairs=max_pairs)
        except PairLimitError as exc:
            raise GalleryValidationError(f"{exc}: raise it (e.g. a lower `far`)") from None
        if not ia.size:
            return []
        order = np.lexsort((ids[ib], ids[ia], -sc))
        records = store.get_many(np.unique(np.concatenate([ids[ia], ids[ib]])).tolist())
        pairs = []
        for j in order:
            a, b = records.get(int(ids[ia[j]])), records.get(int(ids[ib[j]]))
            if a is None or b is None:
                continue
            conflict = a.patient_id is not None and b.patient_id is not None and a.patient_id != b.patient_id
            pairs.append(DuplicatePair(a=a, b=b, score=float(sc[j]), conflict=conflict))
        return pairs

    @property
    def generation(self) -> int:
        """Bumped by every change to the set of vectors: results computed at one generation hold
        until it moves."""
        self._check_open()
        return int(self._store.meta_get("generation") or 0)

    def remove_orphan_blobs(self) -> int:
        """Delete stored originals no row references, and temp files; returns how many files went.

        Only a crash between writing a blob and committing its row leaves such files behind.
        """
        with self._wlock:
            self._check_open()
            return self._store.remove_orphan_blobs()

    def looks_consistent(self) -> bool:
        """The cheap check a readiness probe can afford on every call: FAISS holds as many live
        vectors as SQLite has rows (one COUNT, no id lists, no write lock). A mismatch, which a
        write in flight can also cause for a moment, falls back to the full ``is_consistent``."""
        self._check_open()
        if self._index.ntotal == self._store.count():
            return True
        return self.is_consistent()

    def is_consistent(self) -> bool:
        """FAISS holds exactly the SQLite ids, and every row carries the gallery's single model id."""
        self._check_open()
        with self._wlock:
            store = self._store
            sql_ids = store.ids()
            faiss_ids = self._index.ids()
            if not np.array_equal(sql_ids, faiss_ids):
                log.warning(
                    "FAISS/SQLite mismatch: %d ids in SQLite, %d in FAISS", sql_ids.size, faiss_ids.size
                )
                return False
            models = store.model_ids()
            meta_model = store.meta_get("model_id")
            if len(models) > 1 or (models and models[0] != meta_model):
                log.warning("gallery rows carry model ids %s (gallery model %s)", models, meta_model)
                return False
            return True

    # ---------------------------------------------------------------- reindex
    def reindex(
        self,
        embed: Callable[[list[ImageRecord]], np.ndarray],
        *,
        model_id: str,
        batch_size: int = 64,
        progress: ProgressLike | None = None,
    ) -> int:
        """Re-embed every image with a new model and switch the gallery to it; returns the image count.

        ``embed(records)`` returns (len(records), dim) vectors; it reads ``stored_path`` or
        ``source_path`` itself. Batches are committed to a staging table as they go; the swap of all
        vectors + model ids is one transaction at the end. If interrupted, calling reindex again with
        the same model_id (and dim) resumes after the last committed batch. ``progress`` is
        ``callable(n_done, n_total)`` or a tqdm-like object (``update``/``total``).
        """
        self._check_open()
        if not isinstance(model_id, str) or not model_id.strip():
            raise GalleryValidationError("model_id must be a non-empty string")
        if int(batch_size) < 1:
            raise GalleryValidationError("batch_size must be >= 1")
        report = _progress_reporter(progress)
        store = self._store
        target = f"{model_id}\x1f{self.dim}"
        with store.write_txn() as conn:
            if store.meta_get("reindex_target", conn) != target:
                conn.execute("DELETE FROM reindex_staging")
                store.meta_set(conn, "reindex_target", target)
            else:
                log.info("resuming the reindex to %s", model_id)

        def pending(limit: int) -> list[int]:
            rows = (
                store.reader()
                .execute(
                    "SELECT i.image_id FROM images i LEFT JOIN reindex_staging s ON s.image_id = i.image_id "
                    "WHERE s.image_id IS NULL ORDER BY i.image_id LIMIT ?",
                    (limit,),
                )
                .fetchall()
            )
            return [int(r[0]) for r in rows]

        def staged() -> int:
            return int(
                store.reader()
                .execute("SELECT COUNT(*) FROM reindex_staging s JOIN images i ON i.image_id = s.image_id")
                .fetchone()[0]
            )

        def run_batch(ids: list[int]) -> int:
            by_id = store.get_many(ids)
            records = [by_id[i] for i in ids if i in by_id]
            if not records:
                return 0
            x = self._vectors(embed(records), what="embed() output")
            if x.shape[0] != len(records):
                raise GalleryValidationError(
                    f"embed() returned {x.shape[0]} vectors for {len(records)} images"
                )
            with store.write_txn() as conn:
                conn.executemany(
                    "INSERT OR REPLACE INTO reindex_staging (image_id, vector) "
                    "SELECT image_id, ? FROM images WHERE image_id = ?",
                    [(xi.astype("<f4").tobytes(), r.image_id) for xi, r in zip(x, records, strict=True)],
                )
            return len(records)

        done = staged()
        report(done, len(self))
        while ids := pending(int(batch_size)):  # embed outside the write lock: adds can go on
            done += run_batch(ids)
            report(done, len(self))
        with self._wlock:
            while ids := pending(int(batch_size)):  # images added while we were embedding
                done += run_batch(ids)
                report(done, len(self))
            with store.write_txn() as conn:
                conn.execute(
                    "UPDATE images SET model_id = ?, vector = "
                    "(SELECT s.vector FROM reindex_staging s WHERE s.image_id = images.image_id)",
                    (model_id,),
                )
                conn.execute("DELETE FROM reindex_staging")
                store.meta_set(conn, "reindex_target", None)
                store.meta_set(conn, "model_id", model_id)
                store.meta_set(conn, "dim", str(self.dim))
                store.bump_generation(conn)
            self.model_id = model_id
            self._mismatch = False
            self._stored_dim = self.dim
            self._index = self._build()
            self._invalidate()
            self._save_index(self._index)
            n = len(self)
        report(n, n)
        log.info("reindexed %d images with model %s", n, model_id)
        return n


def cluster_pairs(pairs: Iterable[DuplicatePair]) -> list[list[int]]:
    """Connected components of image ids linked by pairs (union-find); largest first, ids ascending."""
    parent: dict[int, int] = {}

    def find(i: int) -> int:
        parent.setdefault(i, i)
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:  # path compression
            parent[i], i = root, parent[i]
        return root

    for p in pairs:
        ra, rb = find(p.a.image_id), find(p.b.image_id)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in parent:
        groups.setdefault(find(i), []).append(i)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: (-len(g), g[0]))
