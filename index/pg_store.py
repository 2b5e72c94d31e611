"""PostgreSQL as the gallery's truth: many writers, one database (``CXR_REID_DATABASE_URL``).

``PgStore`` is ``Store`` (index/store.py) on PostgreSQL through psycopg 3: the same statements
(``?`` placeholders are rewritten to psycopg's), the same row and blob code; what differs is here:

- Connections: one writer connection per process, used under ``write_lock`` as with SQLite, and one
  reader connection per thread (autocommit; ``read_txn`` is a REPEATABLE READ snapshot). A broken
  connection (PostgreSQL restarted, network cut) is replaced at its next use: the request that met
  it fails with ``GalleryUnavailableError`` (503, try again), nothing half-written stays.
- Many writers: any number of service replicas and jobs write at once. Uniqueness that matters is
  the database's (a SOPInstanceUID once per collection: ``GalleryDuplicateError`` for the loser),
  not a process lock.
- The change log (table ``changes``): every write appends what it changed, in its transaction, and
  NOTIFYs ``cxr_reid_changes``; replicas apply the log to their in-memory index (index/follow.py).
- Migrations: numbered SQL files under ``index/migrations/``, each applied in one transaction and
  recorded in ``schema_migrations``, under an advisory lock so replicas starting together do not
  race. Plain SQL rather than Alembic: the statements here are hand-written, with no SQLAlchemy
  models for Alembic to compare against, so it would add SQLAlchemy for a version table.
- Originals: a content-addressed blob store in a directory every replica mounts (``blob_dir``);
  an unreferenced file is removed at open only when older than ``ORPHAN_GRACE_SECONDS``, since
  another replica may have written it a moment before committing its row.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import psycopg
from psycopg import errors as pg_errors

from ._fs import make_private_dir
from .records import GalleryDuplicateError, GalleryError, GalleryUnavailableError
from .store import Store

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
NOTIFY_CHANNEL = "cxr_reid_changes"
ORPHAN_GRACE_SECONDS = 3600.0
_MIGRATION_LOCK = 0x6378725F72656964  # "cxr_reid": the advisory lock migrations take
_MIGRATION_RE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
CHANGE_KINDS = ("add", "delete", "relabel", "calibration", "reindex")


def is_database_url(value: str | None) -> bool:
    """``value`` names a PostgreSQL database (``postgresql://`` or ``postgres://``)."""
    return bool(value) and urlsplit(str(value)).scheme in ("postgresql", "postgres")


def redacted(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every migration shipped, in order."""
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        m = _MIGRATION_RE.match(path.name)
        if m is None:
            raise GalleryError(f"migration file {path.name} is not named NNNN_words.sql")
        found.append((int(m.group(1)), path.name, path.read_text(encoding="utf-8")))
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise GalleryError(f"migrations are not numbered 1..n without gaps: {versions}")
    return found


SCHEMA_VERSION = len(migrations())


def _plain(value: Any) -> Any:
    """numpy scalars as Python numbers: psycopg adapts only the latter."""
    return value.item() if isinstance(value, np.generic) else value


class PgConnection:
    """A psycopg connection that takes the SQLite-style statements of ``Store`` (``?`` placeholders),
    so the row code is written once. Autocommit: transactions are the explicit BEGIN ... COMMIT of
    ``PgStore``."""

    _sql_cache: dict[str, str] = {}

    def __init__(self, raw: psycopg.Connection, url: str) -> None:
        self.raw = raw
        self.url = url

    @classmethod
    def _sql(cls, sql: str) -> str:
        converted = cls._sql_cache.get(sql)
        if converted is None:
            converted = cls._sql_cache[sql] = sql.replace("%", "%%").replace("?", "%s")
        return converted

    def execute(self, sql: str, args: Sequence[Any] = ()) -> psycopg.Cursor:
        try:
            cur = self.raw.cursor()
            cur.execute(self._sql(sql), [_plain(a) for a in args])
        except psycopg.OperationalError as exc:  # restarted, unreachable: the caller may try again
            raise unavailable(self.url, exc) from exc
        return cur

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> psycopg.Cursor:
        try:
            cur = self.raw.cursor()
            cur.executemany(self._sql(sql), [[_plain(a) for a in row] for row in rows])
        except psycopg.OperationalError as exc:
            raise unavailable(self.url, exc) from exc
        return cur

    @property
    def broken(self) -> bool:
        return self.raw.closed or self.raw.broken

    def close(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self.raw.close()


def connect(url: str, *, application_name: str = "cxr-reid") -> PgConnection:
    """An autocommit connection to ``url``; ``GalleryUnavailableError`` naming the database (not its
    password) when it cannot be reached."""
    try:
        raw = psycopg.connect(url, autocommit=True, connect_timeout=10, application_name=application_name)
    except psycopg.Error as exc:
        raise GalleryUnavailableError(f"cannot reach the gallery database {redacted(url)}: {exc}") from exc
    return PgConnection(raw, url)


def unavailable(url: str, exc: BaseException) -> GalleryUnavailableError:
    return GalleryUnavailableError(
        f"the gallery database {redacted(url)} is unavailable ({str(exc).strip() or type(exc).__name__}); "
        "nothing of this request was kept: try again"
    )


def schema_version(conn: PgConnection) -> int:
    """The newest migration applied (0: none, an empty database)."""
    exists = conn.execute("SELECT to_regclass('schema_migrations')").fetchone()[0]
    if exists is None:
        return 0
    return int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0])


def migrate(conn: PgConnection) -> list[str]:
    """Apply the migrations this database lacks, each in its own transaction; returns their names.
    Refuses a database migrated by newer software."""
    applied = []
    conn.execute("BEGIN")
    try:
        conn.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
            " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        have = schema_version(conn)
        if have > SCHEMA_VERSION:
            raise GalleryError(
                f"the gallery database has schema version {have}, newer than this software "
                f"({SCHEMA_VERSION}); upgrade cxr-reid"
            )
        for version, name, sql in migrations():
            if version <= have:
                continue
            conn.raw.execute(sql.encode())  # several statements, no parameters: sent as they are
            conn.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", (version, name))
            applied.append(name)
        if conn.execute("SELECT 1 FROM gallery_meta WHERE key = 'generation'").fetchone() is None:
            conn.execute("INSERT INTO gallery_meta (key, value) VALUES ('generation', '0')")
            conn.execute(
                "INSERT INTO gallery_meta (key, value) VALUES ('instance_id', ?)", (os.urandom(8).hex(),)
            )
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(psycopg.Error):
            conn.execute("ROLLBACK")
        raise
    for name in applied:
        log.info("gallery database: applied migration %s", name)
    return applied


def holds_gallery(url: str) -> bool:
    """The database at ``url`` has a gallery schema (``migrate`` ran on it)."""
    conn = connect(url)
    try:
        return schema_version(conn) > 0
    finally:
        conn.close()


class PgStore(Store):
    """``Store`` on PostgreSQL; see the module docstring for what differs."""

    def __init__(self, url: str, data_dir: Path, *, blob_dir: Path | None = None) -> None:
        """``data_dir``: this replica's local folder (its lock and index cache); ``blob_dir``: the
        shared originals' store (default ``data_dir/images``, right for a single replica only)."""
        self.url = url
        self.data_dir = data_dir
        self.path = Path(redacted(url))  # what messages name
        self.images_dir = Path(blob_dir or data_dir / "images").expanduser().resolve()
        self.write_lock = threading.RLock()
        self._local = threading.local()
        self._readers: list[PgConnection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._txn_ids: set[int] = set()  # images inserted by the open write transaction
        make_private_dir(self.images_dir)
        self._writer = connect(url)
        try:
            self._init_schema()
        except BaseException:
            self._writer.close()
            raise

    # ---------------------------------------------------------------- connections
    def _init_schema(self) -> None:
        migrate(self._writer)

    def _writer_conn(self) -> PgConnection:
        if self._writer.broken:
            self._writer.close()
            self._writer = connect(self.url)
        return self._writer

    def reader(self) -> PgConnection:  # type: ignore[override]
        if self._closed:
            raise GalleryError("gallery is closed")
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.broken:
            with self._readers_lock, contextlib.suppress(ValueError):
                self._readers.remove(conn)
            conn.close()
            conn = None
        if conn is None:
            conn = connect(self.url)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    @contextlib.contextmanager
    def read_txn(self) -> Iterator[PgConnection]:  # type: ignore[override]
        """One snapshot for several statements (REPEATABLE READ, read only)."""
        conn = self.reader()
        if conn.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            yield conn  # nested in this thread's snapshot already
            return
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            yield conn
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.execute("COMMIT")

    @contextlib.contextmanager
    def write_txn(self) -> Iterator[PgConnection]:  # type: ignore[override]
        """BEGIN ... COMMIT on this process's writer connection; ROLLBACK on any exception. A SOP
        instance stored meanwhile by another writer raises ``GalleryDuplicateError``; a lost
        connection ``GalleryUnavailableError``."""
        with self.write_lock:
            if self._closed:
                raise GalleryError("gallery is closed")
            conn = self._writer_conn()
            conn.execute("BEGIN")
            self._txn_ids.clear()
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
                if isinstance(exc, GalleryDuplicateError):
                    raise
                if isinstance(exc, pg_errors.UniqueViolation):
                    raise GalleryDuplicateError(
                        "another writer stored one of these DICOM instances (SOPInstanceUID) in this "
                        "collection a moment ago; nothing of this request was kept"
                    ) from exc
                raise

    def close(self) -> None:
        with self.write_lock:
            if self._closed:
                return
            self._closed = True
            self._writer.close()
            with self._readers_lock:
                for conn in self._readers:
                    conn.close()
                self._readers.clear()

    # ---------------------------------------------------------------- rows
    def insert_image(
        self, conn: PgConnection, row: dict, vector: np.ndarray, model_id: str, created_at: str
    ) -> int:
        """``Store.insert_image``, refusing an original already filed in the collection under the
        same patient by another transaction (``GalleryDuplicateError``): the service looks before it
        writes, but two replicas can look at once. An advisory lock on (collection, sha256) orders
        them; the same bytes twice in one request stay allowed, as with SQLite."""
        if row["sha256"]:
            key = f"{row['collection']}\n{row['sha256']}"
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (key,))
            found = conn.execute(
                "SELECT image_id FROM images WHERE collection = ? AND sha256 = ? "
                "AND patient_id IS NOT DISTINCT FROM ?",
                (row["collection"], row["sha256"], row["patient_id"]),
            ).fetchall()
            if any(int(i) not in self._txn_ids for (i,) in found):
                raise GalleryDuplicateError(
                    "another writer filed this image under the same patient in this collection a moment "
                    "ago; nothing of this request was kept"
                )
        image_id = super().insert_image(conn, row, vector, model_id, created_at)
        self._txn_ids.add(image_id)
        return image_id

    # ---------------------------------------------------------------- change log
    def log_change(
        self, conn: PgConnection, kind: str, ids: Iterable[int] = (), collections: Iterable[str] = ()
    ) -> int:
        """Append a change (in the writer's transaction, after ``bump_generation``) and notify the
        replicas at commit; returns its sequence number."""
        if kind not in CHANGE_KINDS:
            raise ValueError(f"unknown change kind {kind!r}")
        generation = int(self.meta_get("generation", conn) or 0)
        seq = conn.execute(
            "INSERT INTO changes (generation, kind, image_ids, collections) VALUES (?, ?, ?, ?)"
            " RETURNING seq",
            (generation, kind, [int(i) for i in ids], sorted(set(collections))),
        ).fetchone()[0]
        conn.execute(f"NOTIFY {NOTIFY_CHANNEL}, '{int(seq)}'")
        return int(seq)

    def last_change(self, conn: PgConnection | None = None) -> int:
        """The newest committed change's sequence number (0: none)."""
        row = (conn or self.reader()).execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()
        return int(row[0])

    def changes_after(
        self, seq: int, limit: int = 1000
    ) -> list[tuple[int, int, str, list[int], list[str], datetime]]:
        """(seq, generation, kind, image ids, collections, committed at) of changes after ``seq``."""
        rows = (
            self.reader()
            .execute(
                "SELECT seq, generation, kind, image_ids, collections, created_at FROM changes "
                "WHERE seq > ? ORDER BY seq LIMIT ?",
                (int(seq), int(limit)),
            )
            .fetchall()
        )
        return [(int(s), int(g), str(k), list(i), list(c), t) for s, g, k, i, c, t in rows]

    def oldest_after(self, seq: int) -> datetime | None:
        """When the oldest change after ``seq`` was committed (None: there is none): a replica's lag."""
        row = (
            self.reader().execute("SELECT MIN(created_at) FROM changes WHERE seq > ?", (int(seq),)).fetchone()
        )
        return row[0]

    def server_now(self) -> datetime:
        return self.reader().execute("SELECT clock_timestamp()").fetchone()[0]

    # ---------------------------------------------------------------- blobs
    def remove_orphan_blobs(self) -> int:
        """As ``Store.remove_orphan_blobs``, but only files older than ``ORPHAN_GRACE_SECONDS``: in
        a shared blob store a young unreferenced file may be another replica's upload whose row is
        about to commit."""
        if not self.images_dir.exists():
            return 0
        cutoff = time.time() - ORPHAN_GRACE_SECONDS
        with self.write_lock:
            referenced = self.referenced_blobs()
            removed = 0
            for shard in self.images_dir.iterdir():
                if not shard.is_dir():
                    continue
                for f in shard.iterdir():
                    with contextlib.suppress(FileNotFoundError):
                        if f.stat().st_mtime > cutoff or (f.name in referenced):
                            continue
                        if f.name.endswith(".tmp") or len(f.name) == 64:
                            f.unlink()
                            removed += 1
        if removed:
            log.info(
                "removed %d orphaned files older than %.0f s under %s",
                removed,
                ORPHAN_GRACE_SECONDS,
                self.images_dir,
            )
        return removed


def utc_age_seconds(then: datetime | None, now: datetime | None = None) -> float:
    """Seconds from ``then`` to ``now`` (default: this machine's clock); 0 for None."""
    if then is None:
        return 0.0
    return max(0.0, ((now or datetime.now(UTC)) - then).total_seconds())
