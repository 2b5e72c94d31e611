"""SQLite side of the gallery: schema, connections, queries, and the content-addressed blob store.

SQLite is the source of truth (metadata *and* vectors, float32 little-endian BLOBs). Durability:
WAL journal with ``synchronous=FULL``, so a transaction is fsynced before COMMIT returns; anything
``Gallery.add`` acknowledged survives kill -9 and power loss.

Connections: one writer connection (``check_same_thread=False``) used only while holding
``Store.write_lock`` (an RLock the Gallery also uses for FAISS mutation), and one reader connection
per thread (created lazily, ``query_only``). WAL lets readers run while the writer commits; each
reader sees committed data only.

Why one module of this size: it is the storage format (schema, migrations, every statement on the
images table, the blob layout), kept in one place so the format is defined once; the snapshot
reads through it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from . import alerts as alert_sql
from ._fs import PRIVATE_FILE, atomic_write_bytes, fsync_dir, make_private_dir, restrict_file
from .records import (
    GalleryError,
    GalleryIntegrityError,
    GalleryValidationError,
    ImageRecord,
    ModelSwitchingError,
    checked_patient_id,
    now_iso,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DB_NAME = "gallery.sqlite"
IMAGES_DIR = "images"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_IN_CHUNK = 500  # ids per "IN (...)" query, well below SQLite's variable limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS gallery_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    image_id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids of deleted rows are never reused
    patient_id TEXT,
    collection TEXT NOT NULL,
    source_path TEXT,
    blob_sha256 TEXT,                            -- set when the original is stored under images/
    sha256 TEXT,
    sop_instance_uid TEXT,
    study_instance_uid TEXT,
    view TEXT,
    study_date TEXT,
    split TEXT,
    tags TEXT NOT NULL DEFAULT '{}',             -- JSON object
    model_id TEXT NOT NULL,
    created_at TEXT NOT NULL,                    -- ISO-8601 UTC
    vector BLOB NOT NULL                         -- float32 little-endian, unit norm
);
CREATE INDEX IF NOT EXISTS images_patient ON images(patient_id);
CREATE INDEX IF NOT EXISTS images_collection ON images(collection);
CREATE INDEX IF NOT EXISTS images_sha256 ON images(sha256);
CREATE INDEX IF NOT EXISTS images_blob ON images(blob_sha256);
CREATE INDEX IF NOT EXISTS images_sop_instance ON images(sop_instance_uid);  -- STOW-RS idempotency
-- new vectors of an unfinished reindex (see Gallery.reindex)
CREATE TABLE IF NOT EXISTS reindex_staging (image_id INTEGER PRIMARY KEY, vector BLOB NOT NULL);
-- site calibrations fitted on the gallery's labelled images: the newest active one of the serving
-- model is in force (older ones stay as history)
CREATE TABLE IF NOT EXISTS calibrations (
    calibration_id INTEGER PRIMARY KEY AUTOINCREMENT,
    model_id TEXT NOT NULL,
    created_at TEXT NOT NULL,                    -- ISO-8601 UTC
    body TEXT NOT NULL,                          -- JSON: the calibration with its provenance
    active INTEGER NOT NULL DEFAULT 1
);
-- wrong-patient alerts (index/alerts.py), written in the transaction that enrols their image, kept
-- when the image is deleted (an open one is then closed as 'deleted'), never removed
CREATE TABLE IF NOT EXISTS alerts (
    alert_id INTEGER PRIMARY KEY AUTOINCREMENT,
    image_id INTEGER NOT NULL,                   -- the enrolled image (no foreign key: history outlives it)
    collection TEXT NOT NULL,
    patient_id TEXT,                             -- what the image was filed under when raised
    kind TEXT NOT NULL,                          -- matches_other_patient | no_match_with_own_images
    message TEXT NOT NULL,
    score REAL NOT NULL,
    other_patient_id TEXT,
    other_image_id INTEGER,
    own_best_score REAL,
    own_images INTEGER NOT NULL DEFAULT 0,
    operating_point TEXT NOT NULL DEFAULT '{}',  -- JSON: threshold, far, calibration in force
    state TEXT NOT NULL DEFAULT 'open',          -- open | confirmed | dismissed | relabelled | deleted
    created_at TEXT NOT NULL,                    -- ISO-8601 UTC
    resolved_at TEXT,
    resolved_by TEXT,                            -- API key id, or 'anonymous'
    note TEXT,
    new_patient_id TEXT                          -- relabelled: the patient the image was moved to
);
CREATE INDEX IF NOT EXISTS alerts_state ON alerts(state, collection);
CREATE INDEX IF NOT EXISTS alerts_image ON alerts(image_id);
"""

RECORD_COLUMNS = (
    "image_id, model_id, created_at, blob_sha256, patient_id, collection, source_path, sha256, "
    "sop_instance_uid, study_instance_uid, view, study_date, split, tags"
)


def vector_to_blob(v: np.ndarray) -> bytes:
    return np.ascontiguousarray(v, dtype="<f4").tobytes()


def blob_to_vector(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype="<f4").astype(np.float32)


def blobs_to_matrix(blobs: Sequence[bytes], dim: int) -> np.ndarray:
    if not blobs:
        return np.empty((0, dim), dtype=np.float32)
    return np.frombuffer(b"".join(blobs), dtype="<f4").astype(np.float32).reshape(len(blobs), -1)


def _same_model(models: Iterable[str], model_id: str | None) -> None:
    """ModelSwitchingError when ``model_id`` is given and a row's vector is of another model: with
    PostgreSQL a reindex in another process may have swapped every vector a moment ago, before this
    process switched; an answer from them would compare two networks' vectors."""
    if model_id is None:
        return
    other = next((m for m in models if m != model_id), None)
    if other is not None:
        raise ModelSwitchingError(
            f"the gallery's vectors are of model {other!r} now, not {model_id!r}: this process is "
            "switching to it; send the request again in a moment"
        )


def blob_path(images_dir: Path, sha256: str) -> Path:
    """Where the stored original with this sha256 lies under a data dir's ``images/`` folder."""
    return images_dir / sha256[:2] / sha256


# ---------------------------------------------------------------- read-only access (index/snapshot.py)
#: What a snapshot reads of every image, in this order.
SNAPSHOT_COLUMNS = "image_id, patient_id, collection, source_path, blob_sha256, model_id, vector"


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A ``mode=ro`` connection to the database at ``path`` (absolute): it writes nothing and takes
    no gallery lock, so it may read while a server has the gallery open (WAL: it sees committed data)."""
    return sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=30.0)


def read_meta(conn: sqlite3.Connection) -> dict[str, str]:
    """The gallery's meta table (model_id, dim, generation, ...)."""
    return dict(conn.execute("SELECT key, value FROM gallery_meta").fetchall())


def read_images(conn: sqlite3.Connection) -> list[tuple]:
    """``SNAPSHOT_COLUMNS`` of every image, by image_id."""
    return conn.execute(f"SELECT {SNAPSHOT_COLUMNS} FROM images ORDER BY image_id").fetchall()


class Store:
    """Owns the SQLite file and the blob directory of one data dir."""

    def __init__(self, data_dir: Path, *, init: bool = False, other_data: Sequence[Path] = ()) -> None:
        """Open (or, in an empty data dir, create) the database, after the integrity checks.

        ``other_data``: files besides the stored originals whose presence means the dir already held
        a gallery (the FAISS index). ``init=True`` allows a new database where they or stored
        originals are found without one.
        """
        self.data_dir = data_dir
        self.path = data_dir / DB_NAME
        self.images_dir = (data_dir / IMAGES_DIR).resolve()
        self.write_lock = threading.RLock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        if not init:
            self._refuse_new_database_over_data(other_data)
        self._make_private()
        self._writer = self._connect(writer=True)
        try:
            self._check_integrity()
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            self._writer.close()
            if isinstance(exc, sqlite3.OperationalError):  # locked, read-only, I/O: not damage
                raise GalleryError(f"cannot open gallery database {self.path}: {exc}") from exc
            raise self._corrupt(str(exc)) from exc
        except BaseException:
            self._writer.close()
            raise

    def _refuse_new_database_over_data(self, other_data: Sequence[Path]) -> None:
        """A missing or empty database next to stored data is a mis-mounted or lost volume: never
        paper over it with a new empty gallery (the originals would be orphaned)."""
        if self.path.is_file() and self.path.stat().st_size > 0:
            return
        originals = sum(1 for _ in self.images_dir.glob("*/*")) if self.images_dir.is_dir() else 0
        found = [f"{originals:,} stored original(s)"] if originals else []
        found += [f"{p.name}" for p in other_data if p.exists()]
        if found:
            state = "is empty" if self.path.exists() else "is missing"
            raise GalleryIntegrityError(
                f"{self.data_dir} holds {' and '.join(found)} but its database {DB_NAME} {state}: is the "
                "right volume mounted? Restore the database from a backup, or start once with --init "
                "(CXR_REID_INIT=1) to begin a new, empty gallery there"
            )

    def _make_private(self) -> None:
        """The database, its WAL files and the originals' folder are the service user's only.
        SQLite creates the WAL files with the database file's mode, so that is set first."""
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))
        for suffix in ("", "-wal", "-shm"):
            restrict_file(self.path.with_name(self.path.name + suffix))
        make_private_dir(self.images_dir)

    def _check_integrity(self) -> None:
        """SQLite's quick_check (page structure, no index cross-check): seconds for a large gallery."""
        rows = [str(r[0]) for r in self._writer.execute("PRAGMA quick_check(5)").fetchall()]
        if rows != ["ok"]:
            raise self._corrupt("; ".join(rows))

    def _corrupt(self, problem: str) -> GalleryIntegrityError:
        problem = "; ".join(line.strip() for line in problem.splitlines() if line.strip())
        return GalleryIntegrityError(
            f"the gallery database {self.path} is damaged ({problem}); stop the service, restore it "
            "from a backup (or `sqlite3 .recover` it), then run `cxr-reid check`"
        )

    # ---------------------------------------------------------------- connections
    def _connect(self, *, writer: bool) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            if writer:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise GalleryError(f"SQLite refused WAL mode on {self.path} (got {mode})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            if not writer:
                conn.execute("PRAGMA query_only=ON")
        except sqlite3.OperationalError as exc:  # locked, read-only, I/O: not damage
            raise GalleryError(f"cannot open gallery database {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:  # "file is not a database", "malformed"
            raise self._corrupt(str(exc)) from exc
        except sqlite3.Error as exc:
            raise GalleryError(f"cannot open gallery database {self.path}: {exc}") from exc
        return conn

    def _writer_conn(self) -> sqlite3.Connection:
        """The writer connection (a database server's subclass reconnects a broken one here)."""
        return self._writer

    def reader(self) -> sqlite3.Connection:
        """This thread's read-only connection."""
        if self._closed:
            raise GalleryError("gallery is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect(writer=False)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    @contextlib.contextmanager
    def read_txn(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for reads that take several statements."""
        conn = self.reader()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    @contextlib.contextmanager
    def write_txn(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT on the writer connection; ROLLBACK on any exception."""
        with self.write_lock:
            if self._closed:
                raise GalleryError("gallery is closed")
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self.write_lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(sqlite3.Error):
                self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._writer.close()
            with self._readers_lock:
                for conn in self._readers:
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()
                self._readers.clear()

    # ---------------------------------------------------------------- schema and meta
    def _init_schema(self) -> None:
        with self.write_txn() as conn:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif int(row[0]) > SCHEMA_VERSION:
                raise GalleryError(
                    f"gallery {self.path} has schema version {row[0]}, newer than this software "
                    f"({SCHEMA_VERSION}); upgrade cxr-reid"
                )
            # future migrations: elif row[0] < SCHEMA_VERSION: migrate step by step, then update
            if self.meta_get("generation", conn) is None:
                conn.execute("INSERT INTO gallery_meta (key, value) VALUES ('generation', '0')")
                conn.execute(
                    "INSERT INTO gallery_meta (key, value) VALUES ('instance_id', ?)", (os.urandom(8).hex(),)
                )

    def meta_get(self, key: str, conn: sqlite3.Connection | None = None) -> str | None:
        row = (
            (conn or self.reader()).execute("SELECT value FROM gallery_meta WHERE key = ?", (key,)).fetchone()
        )
        return None if row is None else str(row[0])

    def meta_set(self, conn: sqlite3.Connection, key: str, value: str | None) -> None:
        if value is None:
            conn.execute("DELETE FROM gallery_meta WHERE key = ?", (key,))
        else:
            conn.execute(
                "INSERT INTO gallery_meta (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, str(value)),
            )

    def bump_generation(self, conn: sqlite3.Connection) -> int:
        """Every change to the vector set bumps this inside its transaction; FAISS files carry it."""
        gen = int(self.meta_get("generation", conn) or 0) + 1
        self.meta_set(conn, "generation", str(gen))
        return gen

    def log_change(
        self, conn: sqlite3.Connection, kind: str, ids: Iterable[int] = (), collections: Iterable[str] = ()
    ) -> int:
        """Record a change for replicas that follow the gallery (index/pg_store.py). One SQLite
        gallery has one process, which applies its own changes: nothing to record."""
        return 0

    def last_change(self, conn: sqlite3.Connection | None = None) -> int:
        """The newest change recorded by ``log_change`` (always 0 here)."""
        return 0

    def id_stats(self, conn: sqlite3.Connection | None = None) -> dict:
        """count / max id / id sum: with the generation they tag a saved FAISS file."""
        c = conn or self.reader()
        count, max_id, id_sum = c.execute(
            "SELECT COUNT(*), COALESCE(MAX(image_id), 0), COALESCE(SUM(image_id), 0) FROM images"
        ).fetchone()
        return {"count": int(count), "max_id": int(max_id), "id_sum": int(id_sum)}

    # ---------------------------------------------------------------- rows
    def insert_image(
        self, conn: sqlite3.Connection, row: dict, vector: np.ndarray, model_id: str, created_at: str
    ) -> int:
        cur = conn.execute(
            "INSERT INTO images (patient_id, collection, source_path, blob_sha256, sha256, sop_instance_uid,"
            " study_instance_uid, view, study_date, split, tags, model_id, created_at, vector)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING image_id",
            (
                row["patient_id"],
                row["collection"],
                row["source_path"],
                row["blob_sha256"],
                row["sha256"],
                row["sop_instance_uid"],
                row["study_instance_uid"],
                row["view"],
                row["study_date"],
                row["split"],
                json.dumps(row["tags"], sort_keys=True),
                model_id,
                created_at,
                vector_to_blob(vector),
            ),
        )
        return int(cur.fetchone()[0])

    def inserted_record(self, image_id: int, row: dict, model_id: str, created_at: str) -> ImageRecord:
        """The record of a row ``insert_image`` wrote (without reading it back)."""
        return ImageRecord(
            image_id=image_id,
            model_id=model_id,
            created_at=created_at,
            stored_path=str(self.blob_path(row["blob_sha256"])) if row["blob_sha256"] else None,
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

    def to_record(self, row: Sequence) -> ImageRecord:
        (
            image_id,
            model_id,
            created_at,
            blob_sha,
            patient_id,
            collection,
            source_path,
            sha256,
            sop,
            study,
            view,
            study_date,
            split,
            tags,
        ) = row
        return ImageRecord(
            image_id=int(image_id),
            model_id=model_id,
            created_at=created_at,
            stored_path=str(self.blob_path(blob_sha)) if blob_sha else None,
            patient_id=patient_id,
            collection=collection,
            source_path=source_path,
            sha256=sha256,
            sop_instance_uid=sop,
            study_instance_uid=study,
            view=view,
            study_date=study_date,
            split=split,
            tags=json.loads(tags) if tags else {},
        )

    def get(self, image_id: int) -> ImageRecord | None:
        row = (
            self.reader()
            .execute(f"SELECT {RECORD_COLUMNS} FROM images WHERE image_id = ?", (int(image_id),))
            .fetchone()
        )
        return None if row is None else self.to_record(row)

    def _rows_by_id(
        self, columns: str, ids: Sequence[int], conn: sqlite3.Connection | None = None
    ) -> Iterator[tuple]:
        """``SELECT columns`` of the given image ids (each once), ``_IN_CHUNK`` ids a query; ids not
        found are left out. ``columns`` starts with image_id."""
        c = conn or self.reader()
        uniq = list(dict.fromkeys(int(i) for i in ids))
        for s in range(0, len(uniq), _IN_CHUNK):
            part = uniq[s : s + _IN_CHUNK]
            marks = ",".join("?" * len(part))
            yield from c.execute(f"SELECT {columns} FROM images WHERE image_id IN ({marks})", part)

    def get_many(self, ids: Sequence[int], conn: sqlite3.Connection | None = None) -> dict[int, ImageRecord]:
        return {int(row[0]): self.to_record(row) for row in self._rows_by_id(RECORD_COLUMNS, ids, conn)}

    def get_vectors(self, ids: Sequence[int], model_id: str | None = None) -> dict[int, np.ndarray]:
        """Stored vectors by id (ids not found are left out); with ``model_id``, ModelSwitchingError
        when a row holds another model's vector (``_same_model``)."""
        rows = list(self._rows_by_id("image_id, model_id, vector", ids))
        _same_model((r[1] for r in rows), model_id)
        return {int(i): blob_to_vector(blob) for i, _, blob in rows}

    def get_vector(self, image_id: int, model_id: str | None = None) -> np.ndarray | None:
        row = (
            self.reader()
            .execute("SELECT model_id, vector FROM images WHERE image_id = ?", (int(image_id),))
            .fetchone()
        )
        if row is None:
            return None
        _same_model([row[0]], model_id)
        return blob_to_vector(row[1])

    @staticmethod
    def _where(patient_id: str | None, collection: str | None) -> tuple[str, list]:
        clauses, args = [], []
        if patient_id is not None:
            clauses.append("patient_id = ?")
            args.append(patient_id)
        if collection is not None:
            clauses.append("collection = ?")
            args.append(collection)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    def list_images(
        self, patient_id: str | None, collection: str | None, offset: int, limit: int
    ) -> tuple[list[ImageRecord], int]:
        where, args = self._where(patient_id, collection)
        with self.read_txn() as c:
            total = int(c.execute(f"SELECT COUNT(*) FROM images{where}", args).fetchone()[0])
            rows = c.execute(
                f"SELECT {RECORD_COLUMNS} FROM images{where} ORDER BY image_id LIMIT ? OFFSET ?",
                [*args, int(limit), int(offset)],
            ).fetchall()
        return [self.to_record(r) for r in rows], total

    def records_with_vectors(
        self, patient_id: str | None, collection: str | None, dim: int, model_id: str | None = None
    ) -> tuple[list[ImageRecord], np.ndarray]:
        where, args = self._where(patient_id, collection)
        rows = (
            self.reader()
            .execute(f"SELECT {RECORD_COLUMNS}, vector FROM images{where} ORDER BY image_id", args)
            .fetchall()
        )
        records = [self.to_record(r[:-1]) for r in rows]
        _same_model((r.model_id for r in records), model_id)
        return records, blobs_to_matrix([r[-1] for r in rows], dim)

    def ids(self, collection: str | None = None, conn: sqlite3.Connection | None = None) -> np.ndarray:
        where, args = self._where(None, collection)
        c = conn or self.reader()
        rows = c.execute(f"SELECT image_id FROM images{where} ORDER BY image_id", args).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def count(self) -> int:
        return int(self.reader().execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def collection_counts(self) -> dict[str, int]:
        rows = (
            self.reader()
            .execute("SELECT collection, COUNT(*) FROM images GROUP BY collection ORDER BY collection")
            .fetchall()
        )
        return {str(c): int(n) for c, n in rows}

    def model_ids(self, conn: sqlite3.Connection | None = None) -> list[str]:
        rows = (conn or self.reader()).execute("SELECT DISTINCT model_id FROM images").fetchall()
        return sorted(str(r[0]) for r in rows)

    def iter_vectors(
        self, collection: str | None = None, chunk: int = 8192, conn: sqlite3.Connection | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) in id order, ``chunk`` rows at a time (keyset pagination, no big OFFSETs)."""
        c = conn or self.reader()
        last = -1
        coll_sql = " AND collection = ?" if collection is not None else ""
        while True:
            args: list = [last]
            if collection is not None:
                args.append(collection)
            rows = c.execute(
                f"SELECT image_id, vector FROM images WHERE image_id > ?{coll_sql} ORDER BY image_id LIMIT ?",
                [*args, chunk],
            ).fetchall()
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            yield ids, blobs_to_matrix([r[1] for r in rows], -1)
            last = int(ids[-1])

    def sample_vectors(self, n: int, conn: sqlite3.Connection | None = None) -> np.ndarray:
        c = conn or self.reader()
        rows = c.execute("SELECT vector FROM images ORDER BY RANDOM() LIMIT ?", (int(n),)).fetchall()
        return blobs_to_matrix([r[0] for r in rows], -1)

    def labelled_vectors(self, collection: str | None, dim: int) -> tuple[list[tuple[str, str]], np.ndarray]:
        """(collection, patient id) and vector of every image with a known patient."""
        where, args = self._where(None, collection)
        where = (where + " AND" if where else " WHERE") + " patient_id IS NOT NULL"
        query = f"SELECT collection, patient_id, vector FROM images{where} ORDER BY image_id"
        rows = self.reader().execute(query, args).fetchall()
        return [(str(r[0]), str(r[1])) for r in rows], blobs_to_matrix([r[2] for r in rows], dim)

    def relabel(self, conn: sqlite3.Connection, image_id: int, patient_id: str | None) -> bool:
        """File an image under another patient (None: unknown) inside a write transaction; False
        when there is no such image. Bumps the generation: labels decide conflicts, so results
        cached per generation (duplicates) must not outlive it."""
        if patient_id is not None and (not isinstance(patient_id, str) or not patient_id.strip()):
            raise GalleryValidationError("patient_id must be a non-empty string or None")
        patient_id = checked_patient_id(patient_id)
        cur = conn.execute(
            "UPDATE images SET patient_id = ? WHERE image_id = ? RETURNING collection",
            (patient_id, int(image_id)),
        )
        row = cur.fetchone()
        if row is not None:
            self.bump_generation(conn)
            self.log_change(conn, "relabel", [int(image_id)], [str(row[0])])
        return row is not None

    def find_by_sha256(self, sha256: str, collection: str | None) -> ImageRecord | None:
        return self._find_first("sha256", sha256, collection)

    def find_by_sop_instance_uid(self, uid: str, collection: str | None) -> ImageRecord | None:
        return self._find_first("sop_instance_uid", uid, collection)

    def _find_first(self, column: str, value: str, collection: str | None) -> ImageRecord | None:
        """The first image (lowest id) whose ``column`` is ``value``; ``column`` is one of ours."""
        where, args = self._where(None, collection)
        where = (where + " AND" if where else " WHERE") + f" {column} = ?"
        row = (
            self.reader()
            .execute(f"SELECT {RECORD_COLUMNS} FROM images{where} ORDER BY image_id LIMIT 1", [*args, value])
            .fetchone()
        )
        return None if row is None else self.to_record(row)

    def delete_rows(
        self, conn: sqlite3.Connection, where: str, args: Sequence
    ) -> tuple[list[int], set[str], set[str]]:
        """Delete matching rows (their open alerts become 'deleted'); returns (ids, their collections,
        blob shas those rows referenced)."""
        rows = conn.execute(
            f"SELECT image_id, collection, blob_sha256 FROM images WHERE {where}", list(args)
        ).fetchall()
        if not rows:
            return [], set(), set()
        ids = [int(r[0]) for r in rows]
        for s in range(0, len(ids), _IN_CHUNK):
            part = ids[s : s + _IN_CHUNK]
            marks = ",".join("?" * len(part))
            conn.execute(f"DELETE FROM images WHERE image_id IN ({marks})", part)
            conn.execute(f"DELETE FROM reindex_staging WHERE image_id IN ({marks})", part)
        alert_sql.close_for_deleted(conn, ids, now_iso())
        return ids, {str(r[1]) for r in rows}, {str(r[2]) for r in rows if r[2]}

    # ---------------------------------------------------------------- blobs
    def blob_path(self, sha256: str) -> Path:
        return blob_path(self.images_dir, sha256)

    def write_blob(self, data: bytes, sha256: str | None = None) -> tuple[str, bool]:
        """Store ``data`` content-addressed and durably (temp + fsync + rename + dir fsync).

        Returns (sha256, created): created is False when the file was already there.
        """
        sha = sha256 or hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha)
        if path.exists():
            return sha, False
        new_dir = not path.parent.exists()
        make_private_dir(path.parent)
        atomic_write_bytes(path, data)
        if new_dir:
            fsync_dir(path.parent.parent)
            fsync_dir(self.images_dir.parent)
        return sha, True

    def blob_referenced(self, sha256: str, conn: sqlite3.Connection | None = None) -> bool:
        c = conn or self.reader()
        return (
            c.execute("SELECT 1 FROM images WHERE blob_sha256 = ? LIMIT 1", (sha256,)).fetchone() is not None
        )

    def original_rows(self) -> Iterator[tuple[int, str | None, str | None, str | None]]:
        """(image_id, blob_sha256, source_path, sha256) of every row, by id: what each row's
        original is (index/originals.py checks them)."""
        yield from self.reader().execute(
            "SELECT image_id, blob_sha256, source_path, sha256 FROM images ORDER BY image_id"
        )

    def referenced_blobs(self) -> set[str]:
        """The distinct stored originals the rows reference (the ``images_blob`` index)."""
        query = "SELECT DISTINCT blob_sha256 FROM images WHERE blob_sha256 IS NOT NULL"
        return {str(r[0]) for r in self.reader().execute(query)}

    def present_blobs(self) -> set[str]:
        """The stored originals' files under ``images/`` (names only; one listing, no reads)."""
        if not self.images_dir.is_dir():
            return set()
        present = set()
        with contextlib.suppress(OSError):
            for shard in os.scandir(self.images_dir):
                if shard.is_dir(follow_symlinks=False):
                    present.update(
                        f.name for f in os.scandir(shard.path) if f.is_file() and _SHA256_RE.match(f.name)
                    )
        return present

    def sample_blobs(self, rng: random.Random, k: int) -> set[str]:
        """Up to ``k`` referenced stored originals picked at random: the first at or after a random
        sha256 in the ``images_blob`` index, so each costs one index seek."""
        conn, picked = self.reader(), set()
        query = "SELECT blob_sha256 FROM images WHERE blob_sha256 >= ? ORDER BY blob_sha256 LIMIT 1"
        for _ in range(k):
            row = conn.execute(query, (f"{rng.getrandbits(256):064x}",)).fetchone()
            if row is None:  # past the last one: wrap around
                row = conn.execute(query, ("",)).fetchone()
            if row is None:
                break
            picked.add(str(row[0]))
        return picked

    def remove_blobs_if_unreferenced(self, shas: set[str] | list[str]) -> int:
        """Unlink blob files no row references any more; call with write_lock held, after the commit."""
        removed = 0
        with self.write_lock:
            for sha in shas:
                if self.blob_referenced(sha, self._writer_conn()):
                    continue
                path = self.blob_path(sha)
                try:
                    path.unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("could not remove stored image %s: %s", path, exc)
                    continue
                with contextlib.suppress(OSError):
                    path.parent.rmdir()  # only succeeds when the shard dir is empty
        return removed

    def remove_orphan_blobs(self) -> int:
        """Unlink blob files (and crashed writers' temp files) no row references; write_lock held."""
        if not self.images_dir.exists():
            return 0
        with self.write_lock:
            referenced = {
                str(r[0])
                for r in self._writer.execute(
                    "SELECT DISTINCT blob_sha256 FROM images WHERE blob_sha256 IS NOT NULL"
                )
            }
            removed = 0
            for shard in self.images_dir.iterdir():
                if not shard.is_dir():
                    continue
                for f in shard.iterdir():
                    if f.name.endswith(".tmp") or (f.name not in referenced and _SHA256_RE.match(f.name)):
                        try:
                            f.unlink()
                            removed += 1
                        except OSError as exc:
                            log.warning("could not remove %s: %s", f, exc)
                with contextlib.suppress(OSError):
                    shard.rmdir()
        if removed:
            log.info("removed %d orphaned files under %s", removed, self.images_dir)
        return removed
