"""The gallery: enrolled radiographs, their identity vectors, and search over them.

Storage (all under ``data_dir``):
- ``gallery.sqlite``: the source of truth. Metadata and the vectors themselves (float32 BLOBs), the
  model id per row and in the meta table, a schema version, and a generation counter that every
  change to the vector set bumps in the same transaction. WAL + ``synchronous=FULL``: when ``add``
  returns, the rows are on disk and survive kill -9 or power loss.
- ``images/<sha256[:2]>/<sha256>``: uploaded originals, content-addressed, written with temp file +
  fsync + rename *before* the row that references them commits; a failed ``add`` removes the files
  it created, a delete removes files no remaining row references (after the commit).
- ``faiss.index`` + ``faiss.index.json``: a cache, in memory and updated in place on add/delete,
  saved tagged with the SQLite state it matches; a missing, corrupt or stale file is rebuilt from
  SQLite on open, so a crash only costs a rebuild (``index/live_index.py``).
- ``.lock``: held while open; a second process gets ``GalleryLockedError`` (``index/lock.py``).

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

``Gallery`` is the facade that orders these steps; each concern lives in a room of its own:
``store`` (SQLite schema, rows, blobs), ``live_index`` (the FAISS index's life: load or build, updates,
compaction, saves, the background rebuild of "auto"), ``faiss_index`` (FAISS itself), ``lock`` (the
process lock), ``validation`` (model check, vectors, new rows), ``reindex`` (resumable re-embedding),
``calibrations`` and ``alerts`` (application state kept in the database), ``clusters`` (duplicates
and their union-find), ``snapshot`` (read-only access for offline tools, no lock, no FAISS).

Why over 600 lines: each public method of the facade spells out the order of its steps (write lock,
SQLite commit, then FAISS, then the hooks); the work itself is done in the rooms above.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import alerts as alert_sql
from . import calibrations
from ._fs import is_disk_full, make_private_dir
from .alerts import AlertRecord, AlertStore, NewAlert
from .clusters import cluster_pairs, duplicate_pairs
from .faiss_index import AUTO, AUTO_FLAT_MAX, validate_factory
from .follow import ChangeFollower
from .live_index import INDEX_FILE, LiveIndex
from .lock import acquire_process_lock, release_process_lock
from .milvus_live import MilvusLiveIndex
from .originals import MissingOriginals, OriginalsReport, check_originals
from .pg_store import PgStore, is_database_url, redacted
from .pg_store import holds_gallery as pg_holds_gallery
from .records import (
    DuplicatePair,
    GalleryError,
    GalleryFullError,
    GalleryModelMismatchError,
    GalleryNotFoundError,
    GalleryValidationError,
    ImageRecord,
    Match,
    ModelSwitchingError,
    NewImage,
    now_iso,
)
from .reindex import ProgressLike, ReindexStaging, progress_reporter
from .snapshot import is_gallery_dir
from .store import DB_NAME, IMAGES_DIR, Store
from .validation import check_model, prepare_row, query_row, unit_rows

# The record and error types are imported above for this module's own use; the package
# (index/__init__.py) is where they are exported, from .records. cluster_pairs lives in .clusters
# and stays importable from here.
__all__ = ["Gallery", "cluster_pairs", "holds_gallery"]

log = logging.getLogger(__name__)

#: A reindex's swap is retried this often when images without a new vector keep arriving (PostgreSQL).
SWAP_TRIES = 5


def holds_gallery(data_dir: str | os.PathLike) -> bool:
    """``data_dir`` holds a gallery's database, or stored data without one (which opening refuses as
    a lost volume, ``GalleryIntegrityError``): what a job that must not start a gallery may open."""
    path = Path(data_dir)
    return is_gallery_dir(path) or (path / IMAGES_DIR).exists() or (path / INDEX_FILE).exists()


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
        create: bool = True,
        database_url: str | None = None,
        blob_dir: str | os.PathLike | None = None,
        follow_poll_seconds: float = 1.0,
        vector_url: str | None = None,
    ) -> None:
        """``create=False``: open an existing gallery only; a data dir without one raises
        ``GalleryNotFoundError`` before anything (folder, database, lock file) is made, so a command
        that only reads or repairs a gallery never leaves an empty one behind (a typo'd --data-dir).

        ``database_url`` (``postgresql://...``): the truth is that PostgreSQL database, shared by
        any number of processes (index/pg_store.py); ``data_dir`` then holds only this process's
        lock and index cache, ``blob_dir`` the originals every replica shares, and the index follows
        the database's change log (index/follow.py, checked every ``follow_poll_seconds`` at most).

        ``vector_url`` (``milvus://host:19530`` or a Milvus Lite ``.db`` path): the vectors are searched
        in Milvus instead of an in-process FAISS index (index/milvus_live.py); SQL stays the truth."""
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
        self._live: LiveIndex | None = None
        self._follower: ChangeFollower | None = None
        self._listeners: list[Callable[[str], None]] = []
        self._reindex_handler: Callable[[], None] | None = None
        self.database_url = database_url
        if database_url is not None and not is_database_url(database_url):
            raise GalleryValidationError("database_url must be a postgresql:// URL")
        if not create:
            if database_url is not None:
                if not pg_holds_gallery(database_url):
                    raise GalleryNotFoundError(
                        f"no gallery in the database {redacted(database_url)}; nothing was created"
                    )
            elif not holds_gallery(self.data_dir):
                raise GalleryNotFoundError(
                    f"no gallery in {self.data_dir} (no {DB_NAME}); nothing was created"
                )
        try:
            make_private_dir(self.data_dir)
            self._lock_fd = acquire_process_lock(self.data_dir)
        except OSError as exc:
            raise GalleryError(f"cannot open gallery data dir {self.data_dir}: {exc}") from exc
        self._store: Store | None = None
        try:
            if database_url is not None:
                self._store = PgStore(
                    database_url, self.data_dir, blob_dir=Path(blob_dir) if blob_dir is not None else None
                )
            else:
                self._store = Store(self.data_dir, init=init, other_data=[self._index_path])
            self._wlock = self._store.write_lock
            self._alerts = AlertStore(self._store, self._check_open)
            stored_dim, self._mismatch = check_model(
                self._store, self.data_dir, self.model_id, self.dim, allow_mismatch=allow_model_mismatch
            )
            if vector_url is not None:
                self._live = MilvusLiveIndex(
                    self._store,
                    self._index_path,
                    vector_url=vector_url,
                    dim=stored_dim,
                    is_closed=lambda: self._closed,
                    is_mismatched=lambda: self._mismatch,
                )
            else:
                self._live = LiveIndex(
                    self._store,
                    self._index_path,
                    dim=stored_dim,
                    factory=self.index_factory,
                    nprobe=self.nprobe,
                    ef_search=self.ef_search,
                    auto_flat_max=self.auto_flat_max,
                    autosave_seconds=self.autosave_seconds,
                    is_closed=lambda: self._closed,
                    is_mismatched=lambda: self._mismatch,
                )
            self._closed = False
            with self._wlock:
                self._store.remove_orphan_blobs()
                with self._store.read_txn() as conn:  # the index and the change it is at: one snapshot
                    applied = self._store.last_change(conn)
                    generation = int(self._store.meta_get("generation", conn) or 0)
                    self._live.open()
                self._missing_originals = MissingOriginals(self._store)
            if isinstance(self._store, PgStore):
                self._follower = ChangeFollower(
                    self._store,
                    self._live,
                    applied=applied,
                    generation=generation,
                    poll_seconds=follow_poll_seconds,
                    on_change=self._changed_elsewhere,
                )
                self._follower.start()
        except BaseException:
            self._closed = True
            if self._follower is not None:
                self._follower.stop()
            if self._live is not None:
                self._live.close()
            if self._store is not None:
                self._store.close()
            release_process_lock(self._lock_fd)
            raise
        log.info(
            "gallery %s open: %d images, model %s, index %s",
            self.data_dir,
            len(self),
            self.stored_model_id,
            self._live.current.effective_factory,
        )

    # ---------------------------------------------------------------- open / close
    def save(self) -> None:
        """Persist the FAISS index now (compacting tombstones / training a fallback index first)."""
        with self._wlock:
            self._check_open()
            self._live.save()

    def close(self) -> None:
        """Save the FAISS index if it changed, close SQLite, release the data-dir lock. Idempotent.

        A background rebuild is cancelled first (it stops between chunks; a k-means already
        training finishes), and waited for: it reads SQLite through the store closed here."""
        if self._follower is not None:
            self._follower.stop()
        if self._live is not None:
            self._live.stop_rebuild()
        with self._wlock:
            if self._closed:
                return
            try:
                if self._live.dirty():
                    self.save()
            except Exception:  # the index is only a cache: the next open rebuilds it
                log.exception("could not save the FAISS index of %s on close", self.data_dir)
            finally:
                self._closed = True
                self._live.close()
                self._store.close()
                release_process_lock(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- background rebuild ("auto")
    @property
    def index_rebuilding(self) -> bool:
        """A background rebuild into a bigger layout is running (searches use the current index)."""
        return self._live.rebuilding

    def wait_for_rebuild(self, timeout: float | None = None) -> bool:
        """Wait for a running background rebuild; True when none is running any more."""
        return self._live.wait_for_rebuild(timeout)

    # ---------------------------------------------------------------- properties
    @property
    def stored_model_id(self) -> str:
        """Model id of the vectors on disk (differs from ``model_id`` only before a reindex)."""
        return self._store.meta_get("model_id") or self.model_id

    @property
    def effective_index_factory(self) -> str:
        """The FAISS layout in use: ``index_factory``, or "Flat" while an IVF index cannot train yet,
        or what "auto" picked for the gallery's size."""
        return self._live.current.effective_factory

    @property
    def originals_dir(self) -> Path:
        """Where the stored originals are (``images/`` in the data dir, or the shared blob dir)."""
        return self._store.images_dir

    @property
    def generation(self) -> int:
        """Bumped by every change to the set of vectors: results computed at one generation hold
        until it moves."""
        self._check_open()
        return int(self._store.meta_get("generation") or 0)

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

    def _check_model_in_txn(self, conn: Any) -> None:
        """In a write transaction, after the generation lock: refuse vectors of another model than
        the gallery's. With PostgreSQL another process may have switched the model (a reindex) since
        this process last looked; it switches too within moments (its follower), so: retry."""
        stored = self._store.meta_get("model_id", conn)
        if stored is not None and stored != self.model_id:
            raise ModelSwitchingError(
                f"the gallery switched to model {stored!r} and this process still embeds with "
                f"{self.model_id!r}: nothing was stored; retry in a moment"
            )

    def _served_model(self) -> str | None:
        """The model whose vectors reads must return (``ModelSwitchingError`` otherwise), or None
        when this process reads whatever is stored (opened for a reindex, on another model)."""
        return None if self._mismatch else self.model_id

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
        x = unit_rows(vectors, self.dim)
        if x.shape[0] != len(images):
            raise GalleryValidationError(f"{x.shape[0]} vectors for {len(images)} images")
        new_alerts = list(alerts) if alerts is not None else [None] * len(images)
        if len(new_alerts) != len(images):
            raise GalleryValidationError(f"{len(new_alerts)} alerts for {len(images)} images")
        rows = [prepare_row(img, i) for i, img in enumerate(images)]
        if not rows:
            return [], []
        store = self._store
        with self._wlock:
            self._check_open()
            self._check_model_matches()
            created: list[str] = []
            created_at = now_iso()
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
                    store.bump_generation(conn)  # locks the generation: ordered with a reindex's swap
                    self._check_model_in_txn(conn)
                    store.log_change(conn, "add", ids, {row["collection"] for row in rows})
            except BaseException as exc:
                # rolled back: drop the files this call wrote (unless a committed row uses them)
                store.remove_blobs_if_unreferenced(set(created))
                if is_disk_full(exc):
                    raise GalleryFullError(
                        f"the disk of {self.data_dir} is full; nothing of this request was kept: free "
                        "space or move the data dir, then send it again"
                    ) from exc
                if isinstance(exc, Exception) and not isinstance(exc, GalleryError):
                    raise GalleryError(f"could not add {len(rows)} images: {exc}") from exc
                raise
            self._missing_originals.stored({row["blob_sha256"] for row in rows if row["blob_sha256"]})
            row_collections = [row["collection"] for row in rows]
            self._apply_committed(
                lambda idx: idx.add(x, np.asarray(ids, dtype=np.int64), row_collections), set(row_collections)
            )
        records = [
            store.inserted_record(i, row, self.model_id, created_at) for i, row in zip(ids, rows, strict=True)
        ]
        return records, stored_alerts

    def _apply_committed(self, change: Callable[[Any], None], collections: Iterable[str]) -> None:
        """Bring the index up to a write just committed (write lock held). Alone on SQLite, apply
        it; on PostgreSQL, catch up with the change log, which holds it and every other writer's
        before it (a failure there is only logged: the commit stands, the follower retries)."""
        if self._follower is None:
            self._live.update(change)
            self._live.invalidate(collections)
        else:
            try:
                self._follower.catch_up()
            except Exception as exc:
                log.warning(
                    "could not catch up with the change log after a write (%s); the follower retries", exc
                )
        self._live.after_write()

    def _changed_elsewhere(self, kind: str) -> None:
        """A ``calibration`` or ``reindex`` change from the change log (index/follow.py). A reindex
        comes on a thread of its own, with the follower paused at it until the index is rebuilt."""
        if kind == "reindex":
            if self._reindex_handler is not None:
                self._reindex_handler()
            else:
                self._reload_after_reindex()
        for listener in list(self._listeners):
            listener(kind)

    def on_reindex(self, handler: Callable[[], None]) -> None:
        """Let ``handler`` take over when another process switches the gallery to a new model (the
        service: it holds its requests, swaps its network, then calls ``reload_after_reindex``)."""
        self._reindex_handler = handler

    def reload_after_reindex(self, adopt_model: str | None = None) -> None:
        """The gallery switched model (a reindex in this process or another): rebuild the index from
        the new vectors. ``adopt_model``: the model this process now embeds with (its next network),
        so that it serves again at once; a process left on another model refuses searches until it
        runs the new one (``GalleryModelMismatchError``)."""
        if adopt_model is not None:
            self.model_id = adopt_model
        self._reload_after_reindex()

    def _reload_after_reindex(self) -> None:
        with self._wlock:
            if self._closed:
                return
            with self._store.read_txn() as conn:  # the index and the change it is at: one snapshot
                applied = self._store.last_change(conn)
                generation = int(self._store.meta_get("generation", conn) or 0)
                stored = self._store.meta_get("model_id", conn)
                self._mismatch = stored is not None and stored != self.model_id
                self._live.reset(int(self._store.meta_get("dim", conn) or self._live.dim))
            if self._follower is not None:
                self._follower.resume(applied, generation)
        log.info(
            "gallery %s now holds model %s vectors (%s)",
            self.data_dir,
            stored,
            "serving" if not self._mismatch else f"this process runs {self.model_id}: searches refused",
        )

    def on_change(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(kind)`` when another process changes the site calibration
        (``"calibration"``) or reindexes (``"reindex"``); PostgreSQL galleries only."""
        self._listeners.append(listener)

    def replication(self) -> dict[str, Any] | None:
        """This replica's place in the change log (applied / latest change, lag in seconds,
        generation), or None for a SQLite gallery (one process, nothing to follow)."""
        self._check_open()
        return None if self._follower is None else self._follower.status()

    def catch_up(self) -> int:
        """Apply the changes other processes committed (PostgreSQL) now; returns how many."""
        self._check_open()
        return 0 if self._follower is None else self._follower.catch_up()

    def _insert_row(self, conn: Any, row: dict, vector: np.ndarray, created_at: str) -> int:
        return self._store.insert_image(conn, row, vector, self.model_id, created_at)

    def _delete_where(self, where: str, args: Sequence) -> int:
        store = self._store
        with self._wlock:
            self._check_open()
            with store.write_txn() as conn:
                ids, collections, shas = store.delete_rows(conn, where, args)
                if ids:
                    store.bump_generation(conn)
                    store.log_change(conn, "delete", ids, collections)
            if not ids:
                return 0
            store.remove_blobs_if_unreferenced(shas)
            self._missing_originals.deleted(shas)
            self._apply_committed(lambda idx: idx.remove(ids), collections)
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

    def set_patient_id(self, image_id: int, patient_id: str | None) -> ImageRecord | None:
        """File an image under another patient (None: unknown); None when there is no such image."""
        self._check_open()
        with self._wlock:
            self._check_open()
            with self._store.write_txn() as conn:
                if not self._store.relabel(conn, image_id, patient_id):
                    return None
        return self.get(image_id)

    # ---------------------------------------------------------------- reads
    def get(self, image_id: int) -> ImageRecord | None:
        self._check_open()
        return self._store.get(int(image_id))

    def get_vector(self, image_id: int) -> np.ndarray | None:
        """The stored unit vector (of ``stored_model_id``), float32 (dim,)."""
        self._check_open()
        return self._store.get_vector(int(image_id), self._served_model())

    def get_vectors(self, image_ids: Iterable[int]) -> dict[int, np.ndarray]:
        """Stored unit vectors by id, in a few queries; ids not found (deleted) are left out."""
        self._check_open()
        return self._store.get_vectors(list(image_ids), self._served_model())

    def image_ids(self, *, collection: str | None = "default") -> np.ndarray:
        """Ids of every image of a collection (None: all), ascending; cached between writes."""
        self._check_open()
        if collection is None:
            return self._store.ids(None)
        return np.asarray(self._live.allowed(collection).ids, dtype=np.int64)

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
        return self._store.records_with_vectors(patient_id, collection, self._live.dim, self._served_model())

    def labelled_vectors(self, *, collection: str | None = None) -> tuple[list[tuple[str, str]], np.ndarray]:
        """(collection, patient id) and vector of every image filed under a patient (collection=None:
        all). Collections are separate namespaces, so a patient is the pair, not the id alone."""
        self._check_open()
        self._check_model_matches()
        return self._store.labelled_vectors(collection, self._live.dim)

    # ---------------------------------------------------------------- site calibration
    def save_calibration(self, calibration: dict[str, Any]) -> int:
        """Keep ``calibration`` (a JSON-able dict) as this model's site calibration; returns its id."""
        self._check_open()
        created_at = now_iso()
        with self._store.write_txn() as conn:
            calibration_id = calibrations.save(conn, self.model_id, calibration, created_at)
            self._store.bump_generation(conn)
            self._store.log_change(conn, "calibration")
        return calibration_id

    def site_calibration(self) -> dict[str, Any] | None:
        """The site calibration in force for this gallery's model, with ``calibration_id`` and
        ``stored_at`` added; None when there is none (the model's own calibration applies)."""
        self._check_open()
        found = calibrations.active(self._store.reader(), self.model_id)
        if found is None:
            return None
        calibration_id, stored_at, body = found
        return {**body, "calibration_id": calibration_id, "stored_at": stored_at}

    def clear_site_calibration(self) -> bool:
        """Stop using the site calibration (kept as history); True when one was in force."""
        self._check_open()
        with self._store.write_txn() as conn:
            cleared = calibrations.deactivate(conn, self.model_id) > 0
            if cleared:
                self._store.bump_generation(conn)
                self._store.log_change(conn, "calibration")
        return cleared

    # ---------------------------------------------------------------- wrong-patient alerts
    def get_alert(self, alert_id: int) -> AlertRecord | None:
        self._check_open()
        return self._alerts.get(alert_id)

    def list_alerts(
        self, *, state: str | None = None, collection: str | None = None, offset: int = 0, limit: int = 100
    ) -> tuple[list[AlertRecord], int]:
        """A page of alerts, newest first, and the total matching (state / collection None: any)."""
        self._check_open()
        return self._alerts.page(state=state, collection=collection, offset=offset, limit=limit)

    def count_alerts(self, state: str | None = "open") -> int:
        self._check_open()
        return self._alerts.count(state)

    def raise_alert(self, image_id: int, alert: NewAlert) -> AlertRecord | None:
        """An open alert about a stored image, raised after its enrolment (a reviewer acting on a
        duplicate conflict); None when there is no such image. Filed with the image's collection and
        patient as they are now, like an enrolment's alert."""
        self._check_open()
        with self._wlock:
            self._check_open()
            record = self.get(image_id)
            if record is None:
                return None
            with self._store.write_txn() as conn:
                return alert_sql.insert(
                    conn,
                    alert,
                    image_id=record.image_id,
                    collection=record.collection,
                    patient_id=record.patient_id,
                    created_at=now_iso(),
                )

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
        return self._alerts.resolve(
            alert_id, state=state, resolved_by=resolved_by, note=note, new_patient_id=new_patient_id
        )

    # ---------------------------------------------------------------- search
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
        q = query_row(vector, self.dim)
        k = int(k)
        if k < 0:
            raise GalleryValidationError("k must be >= 0")
        exclude = {int(i) for i in exclude_ids}
        if k == 0:
            return []
        scores, ids = self._live.search(q, k + len(exclude), collection)
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
        return duplicate_pairs(
            self._store,
            threshold,
            collection=collection,
            chunk=chunk,
            row_thresholds=row_thresholds,
            max_pairs=max_pairs,
        )

    # ---------------------------------------------------------------- consistency
    def remove_orphan_blobs(self) -> int:
        """Delete stored originals no row references, and temp files; returns how many files went.

        Only a crash between writing a blob and committing its row leaves such files behind.
        """
        with self._wlock:
            self._check_open()
            return self._store.remove_orphan_blobs()

    def check_originals(self, *, deep: bool = False) -> OriginalsReport:
        """Every row's original (stored under ``images/`` or referenced by path) is there and
        non-empty; with ``deep``, its bytes hash as recorded (index/originals.py). Reads only."""
        self._check_open()
        report = check_originals(self._store, deep=deep)
        self._missing_originals.recount()
        return report

    def missing_originals(self) -> int:
        """Stored originals missing now, cheaply enough for every readiness probe: counted at open,
        kept current by this gallery's writes, and a random sample checked on each call
        (:class:`index.originals.MissingOriginals`)."""
        self._check_open()
        return self._missing_originals.count()

    def looks_consistent(self) -> bool:
        """The cheap check a readiness probe can afford on every call: FAISS holds as many live
        vectors as SQLite has rows (one COUNT, no id lists, no write lock). A mismatch, which a
        write in flight can also cause for a moment, falls back to the full ``is_consistent``."""
        self._check_open()
        if not self._live.behind and self._live.count() == self._store.count():
            return True
        return self.is_consistent()

    def is_consistent(self) -> bool:
        """FAISS holds exactly the SQLite ids, and every row carries the gallery's single model id.
        With PostgreSQL the index is first brought up to the change log, and compared with the rows
        of the snapshot at that change (other processes keep writing; a few tries)."""
        self._check_open()
        with self._wlock:
            store = self._store
            for _ in range(5):
                if self._follower is not None:
                    self._follower.catch_up()
                with store.read_txn() as conn:
                    if self._follower is not None and store.last_change(conn) != self._follower.applied:
                        continue  # another writer committed meanwhile: catch up and look again
                    sql_ids = store.ids(conn=conn)
                    models = store.model_ids(conn)
                    meta_model = store.meta_get("model_id", conn)
                break
            else:
                log.warning("the gallery changed under every consistency check; assuming it is consistent")
                return True
            faiss_ids = self._live.ids()
            if not np.array_equal(sql_ids, faiss_ids):
                log.warning(
                    "FAISS/SQLite mismatch: %d ids in SQLite, %d in FAISS", sql_ids.size, faiss_ids.size
                )
                return False
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
        switch: bool = True,
    ) -> int:
        """Re-embed every image with a new model and switch the gallery to it; returns the image count.

        ``embed(records)`` returns (len(records), dim) vectors; it reads ``stored_path`` or
        ``source_path`` itself. Batches are committed to a staging table as they go (the new
        network's vectors beside the old ones, which keep being served); the swap of all vectors +
        model ids is one transaction at the end. If interrupted, calling reindex again with the same
        model_id (and dim) resumes after the last committed batch. ``switch=False`` stops before the
        swap: a later call with the same model only embeds what was enrolled meanwhile, then swaps.
        ``progress`` is ``callable(n_done, n_total)`` or a tqdm-like object (``update``/``total``).
        """
        self._check_open()
        if not isinstance(model_id, str) or not model_id.strip():
            raise GalleryValidationError("model_id must be a non-empty string")
        if int(batch_size) < 1:
            raise GalleryValidationError("batch_size must be >= 1")
        report = progress_reporter(progress)
        staging = ReindexStaging(self._store, model_id, self.dim)
        staging.begin()
        done = staging.staged()
        report(done, len(self))

        def embed_pending() -> int:
            n = 0
            while ids := staging.pending(int(batch_size)):
                n += staging.embed_batch(ids, embed)
                report(done + n, len(self))
            return n

        done += embed_pending()  # outside the write lock: adds go on
        if not switch:
            log.info("staged %d images with model %s; run reindex again to switch", done, model_id)
            return done
        with self._wlock:
            for _ in range(SWAP_TRIES):
                done += embed_pending()  # images added while we were embedding
                if staging.swap():
                    break
            else:
                raise GalleryError(
                    f"images kept arriving during the switch to {model_id} ({SWAP_TRIES} tries): "
                    "run reindex again (it resumes)"
                )
            self.model_id = model_id
            self._mismatch = False
            if self._follower is None:
                self._live.reset(self.dim)
            else:
                self._reload_after_reindex()
            n = len(self)
        report(n, n)
        log.info("reindexed %d images with model %s", n, model_id)
        return n
