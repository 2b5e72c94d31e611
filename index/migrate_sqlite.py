"""Moving a SQLite gallery into PostgreSQL (``cxr-reid migrate``): every row with its id, the stored
originals, then proof that both sides hold the same.

- The source is read through ``connect_read_only`` in one read transaction (a WAL snapshot), so it
  is never changed and a server may keep running on it; rows it commits after the start are left
  for the next run.
- Rows keep their ids (``OVERRIDING SYSTEM VALUE``), ``batch_size`` rows per target transaction,
  in id order; each identity sequence is then set past the largest id SQLite ever gave
  (``sqlite_sequence``, which remembers deleted rows too), so no id is ever reused.
- Resumable: a run copies only the rows past the largest id already in the target, then compares
  both sides chunk by chunk (a digest of every column, vectors byte for byte) and rewrites the
  chunks that differ (rows the source changed or deleted since an earlier run). The target must be
  empty or this source's own earlier migration (meta ``migrated_from``) that no replica has written
  to (an empty change log): anything else is refused before anything is written.
- The change log stays empty: a replica opening the database builds its index from the rows and
  starts at the latest change.
- Originals are copied content-addressed (``blob_path``) into ``blob_dir`` (default: the source's
  own ``images/``, then only checked), atomically, and their sha256 checked after the copy. An
  original the source lacks (or holds damaged) is counted, not fatal: the target is as the source.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from tqdm import tqdm

from ._fs import atomic_write_bytes, fsync_dir, make_private_dir
from .lock import LOCK_FILE
from .pg_store import PgConnection, is_database_url, migrate, redacted, schema_version
from .pg_store import connect as pg_connect
from .records import GalleryError
from .snapshot import is_gallery_dir
from .store import DB_NAME, IMAGES_DIR, blob_path, connect_read_only, read_meta

try:  # POSIX only; without it a server holding the source goes unnoticed (reading is safe anyway)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: (table, primary key) copied, in this order; the change log and the schema tables are not.
TABLES: tuple[tuple[str, str], ...] = (
    ("images", "image_id"),
    ("reindex_staging", "image_id"),
    ("calibrations", "calibration_id"),
    ("alerts", "alert_id"),
)
#: Tables whose key is an identity column in PostgreSQL (the others have plain keys).
IDENTITY_TABLES = ("images", "calibrations", "alerts")
#: The meta key naming the source gallery (its instance_id) in a migrated database.
MIGRATED_FROM = "migrated_from"
DEFAULT_BATCH_SIZE = 1000
_MIGRATE_LOCK = 0x6378725F6D696772  # "cxr_migr": one migrate at a time into a database
_BEFORE_ALL = -(2**63)


class MigrationError(GalleryError):
    """The migration cannot run or was refused (one line, saying whether anything was written)."""


@dataclass
class MigrationSummary:
    """What a run did and found; ``verified`` only when both sides hold the same."""

    source: Path
    target: str  # the database URL without its password
    instance_id: str
    rows: dict[str, int] = field(default_factory=dict)  # per table, in the source snapshot
    copied: dict[str, int] = field(default_factory=dict)  # rows written by this run (resume: the rest)
    rewritten: dict[str, int] = field(default_factory=dict)  # rows rewritten: changed since a run
    blobs_copied: int = 0
    blobs_present: int = 0  # already in the blob dir with the right sha256
    blobs_missing: list[str] = field(default_factory=list)  # referenced, not in the source
    blobs_damaged: list[str] = field(default_factory=list)  # in the source, but not matching its sha256
    differences: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def verified(self) -> bool:
        return not self.differences

    def line(self) -> str:
        """The one summary line of ``cxr-reid migrate``."""
        rows = ", ".join(f"{table} {n:,}" for table, n in self.rows.items())
        copied = sum(self.copied.values()) + sum(self.rewritten.values())
        missing = len(self.blobs_missing) + len(self.blobs_damaged)
        return (
            f"gallery {self.instance_id} from {self.source} into {self.target}: rows {rows} "
            f"({copied:,} written by this run); originals {self.blobs_copied:,} copied, "
            f"{self.blobs_present:,} already there, {missing:,} missing or damaged in the source; "
            f"{'verified' if self.verified else 'NOT verified'} in {self.seconds:.1f} s"
        )


def migrate_sqlite(
    data_dir: str | os.PathLike,
    url: str,
    *,
    blob_dir: str | os.PathLike | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
    on_batch: Callable[[str, int], None] | None = None,
) -> MigrationSummary:
    """Copy the SQLite gallery of ``data_dir`` into the PostgreSQL database at ``url`` and verify it.

    ``on_batch(table, rows)`` is called after each committed batch (tests interrupt a run there).
    ``MigrationError`` when it cannot run or the target is refused; differences found at the end
    are in the summary (``verified`` False), not raised."""
    started = time.monotonic()
    if not is_database_url(url):
        raise MigrationError("the target must be a postgresql:// URL; nothing was written")
    if batch_size < 1:
        raise MigrationError(f"batch size {batch_size}: give at least 1")
    source_dir = Path(data_dir).expanduser().resolve()
    if not is_gallery_dir(source_dir):
        raise MigrationError(f"no gallery in {source_dir} (no {DB_NAME}); nothing was written")
    source_images = source_dir / IMAGES_DIR
    target_images = Path(blob_dir).expanduser().resolve() if blob_dir is not None else source_images
    if _held_by_a_process(source_dir):
        log.warning(
            "a process (a server?) has the gallery in %s open: it is read as it is now; images it adds "
            "later are not included unless migrate is run again (it resumes and copies them)",
            source_dir,
        )
    try:
        src = connect_read_only(source_dir / DB_NAME)
        src.execute("BEGIN")  # one snapshot for the whole run
        meta = read_meta(src)
    except sqlite3.Error as exc:
        raise MigrationError(f"cannot read the gallery database in {source_dir}: {exc}") from None
    try:
        instance = meta.get("instance_id")
        if not instance:
            raise MigrationError(f"the gallery in {source_dir} has no instance_id; nothing was written")
        summary = MigrationSummary(source=source_dir, target=redacted(url), instance_id=instance)
        dst = pg_connect(url, application_name="cxr-reid migrate")
        try:
            _migrate(src, dst, meta, summary, target_images, source_images, batch_size, progress, on_batch)
        except psycopg.Error as exc:
            raise MigrationError(
                f"the gallery database {redacted(url)} failed ({str(exc).strip()}); what was committed "
                "is kept: run migrate again to resume"
            ) from exc
        finally:
            dst.close()
    except sqlite3.Error as exc:
        raise MigrationError(f"cannot read the gallery database in {source_dir}: {exc}") from None
    finally:
        src.close()
    summary.seconds = time.monotonic() - started
    return summary


def _migrate(
    src: sqlite3.Connection,
    dst: PgConnection,
    meta: dict[str, str],
    summary: MigrationSummary,
    target_images: Path,
    source_images: Path,
    batch_size: int,
    progress: bool,
    on_batch: Callable[[str, int], None] | None,
) -> None:
    if not dst.execute("SELECT pg_try_advisory_lock(?)", (_MIGRATE_LOCK,)).fetchone()[0]:
        raise MigrationError(
            f"another cxr-reid migrate is writing into {summary.target}; nothing was written"
        )
    if schema_version(dst) > 0:
        _check_target(dst, meta, summary.target)  # before migrate(): a refused target is left alone
    migrate(dst)
    _check_target(dst, meta, summary.target)
    columns = {table: _columns(src, dst, table) for table, _ in TABLES}
    with _txn(dst):
        for key, value in {**meta, MIGRATED_FROM: meta["instance_id"]}.items():
            dst.execute(
                "INSERT INTO gallery_meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )
    keys = {
        table: [int(r[0]) for r in src.execute(f"SELECT {key} FROM {table} ORDER BY {key}")]
        for table, key in TABLES
    }
    summary.rows = {table: len(ids) for table, ids in keys.items()}
    with tqdm(total=sum(summary.rows.values()), desc="rows", unit="row", disable=not progress) as bar:
        for table, key in TABLES:
            summary.copied[table] = _copy_new_rows(
                src, dst, table, key, columns[table], batch_size, bar, on_batch
            )
    _set_sequences(src, dst)
    for table, key in TABLES:
        _reconcile(src, dst, table, key, columns[table], keys[table], batch_size, summary)
    _copy_blobs(src, source_images, target_images, summary, progress)
    _verify_meta_and_sequences(src, dst, meta, summary)


# ---------------------------------------------------------------- the target
def _held_by_a_process(data_dir: Path) -> bool:
    """A process holds the gallery's lock (index/lock.py); tried with a shared lock, released at once."""
    if fcntl is None:  # pragma: no cover
        return False
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # drops the lock taken
    return False


def _check_target(dst: PgConnection, meta: dict[str, str], target: str) -> None:
    """Refuse a target that holds another gallery, or this one written to since it was migrated."""
    have = dict(dst.execute("SELECT key, value FROM gallery_meta").fetchall())
    counts = {
        table: int(dst.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
        for table in ("images", "reindex_staging", "calibrations", "alerts", "changes")
    }
    if have.get(MIGRATED_FROM) == meta["instance_id"]:
        if counts["changes"]:
            raise MigrationError(
                f"{target} was written to after gallery {meta['instance_id']} was migrated into it "
                f"({counts['changes']} change(s) since): copying again could clash with those; nothing was "
                "written. Migrate into a new, empty database"
            )
        return
    if any(counts.values()):
        raise MigrationError(
            f"{target} already holds another gallery (instance {have.get('instance_id')}, "
            f"{counts['images']:,} images); nothing was written. Migrate into a new, empty database"
        )
    for key in ("model_id", "dim"):
        if key in have and key in meta and have[key] != meta[key]:
            raise MigrationError(
                f"{target} is an empty gallery opened for {key} {have[key]}, not {meta[key]} as the source: "
                "is a replica running on it? Nothing was written. Migrate into a new, empty database"
            )


def _columns(src: sqlite3.Connection, dst: PgConnection, table: str) -> list[str]:
    """The source table's columns, all of which the target must have."""
    names = [str(r[1]) for r in src.execute(f"PRAGMA table_info({table})")]
    have = {
        str(r[0])
        for r in dst.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ?",
            (table,),
        )
    }
    lacking = [n for n in names if n not in have]
    if not names or lacking:
        raise MigrationError(
            f"the database's table {table} lacks the source's columns {lacking or '(the whole table)'}: "
            "is this cxr-reid older than the gallery? Nothing was copied"
        )
    return names


@contextlib.contextmanager
def _txn(conn: PgConnection) -> Iterator[PgConnection]:
    """One target transaction: COMMIT, or ROLLBACK on any exception (Ctrl-C included)."""
    conn.execute("BEGIN")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(psycopg.Error):
            conn.execute("ROLLBACK")
        raise


# ---------------------------------------------------------------- rows
def _range(key: str, lo: int | None, hi: int | None) -> tuple[str, list[int]]:
    """``WHERE`` for ``lo < key <= hi`` (None: open)."""
    clauses, args = [], []
    if lo is not None:
        clauses.append(f"{key} > ?")
        args.append(lo)
    if hi is not None:
        clauses.append(f"{key} <= ?")
        args.append(hi)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def _pages(
    conn: sqlite3.Connection | PgConnection,
    table: str,
    key: str,
    columns: Sequence[str],
    batch_size: int,
    lo: int | None = None,
    hi: int | None = None,
) -> Iterator[list[tuple]]:
    """The rows with ``lo < key <= hi`` in key order, ``batch_size`` a page (keyset pagination)."""
    cols = ", ".join(columns)
    last = lo
    while True:
        where, args = _range(key, last, hi)
        rows = conn.execute(
            f"SELECT {cols} FROM {table}{where} ORDER BY {key} LIMIT ?", [*args, batch_size]
        ).fetchall()
        if not rows:
            return
        yield rows
        last = int(rows[-1][0])


def _insert(dst: PgConnection, table: str, key: str, columns: Sequence[str], rows: list[tuple]) -> None:
    overriding = " OVERRIDING SYSTEM VALUE" if table in IDENTITY_TABLES else ""
    marks = ", ".join("?" * len(columns))
    try:
        dst.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}){overriding} VALUES ({marks}) "
            f"ON CONFLICT ({key}) DO NOTHING",
            rows,
        )
    except pg_errors.UniqueViolation as exc:  # a SOPInstanceUID twice in a collection: SQLite allowed it
        raise MigrationError(
            f"{table}: {str(exc).strip().splitlines()[-1]}: PostgreSQL stores a DICOM instance once per "
            "collection; delete the extra image in the source, then run migrate again (it resumes)"
        ) from exc


def _copy_new_rows(
    src: sqlite3.Connection,
    dst: PgConnection,
    table: str,
    key: str,
    columns: Sequence[str],
    batch_size: int,
    bar: tqdm,
    on_batch: Callable[[str, int], None] | None,
) -> int:
    """Copy the source rows past the largest key already in the target (an earlier run's), a batch per
    transaction; returns how many."""
    top = dst.execute(f"SELECT MAX({key}) FROM {table}").fetchone()[0]
    after = None if top is None else int(top)
    if after is not None:
        bar.update(int(src.execute(f"SELECT COUNT(*) FROM {table} WHERE {key} <= ?", (after,)).fetchone()[0]))
    copied = 0
    for rows in _pages(src, table, key, columns, batch_size, lo=after):
        with _txn(dst):
            _insert(dst, table, key, columns, rows)
        copied += len(rows)
        bar.update(len(rows))
        if on_batch is not None:
            on_batch(table, len(rows))
    return copied


def _set_sequences(src: sqlite3.Connection, dst: PgConnection) -> None:
    """Each identity sequence past the largest id SQLite ever gave (deleted rows' ids included)."""
    given = dict(src.execute("SELECT name, seq FROM sqlite_sequence").fetchall())
    with _txn(dst):
        for table, key in TABLES:
            if table not in IDENTITY_TABLES:
                continue
            top = max(
                int(given.get(table) or 0),
                int(dst.execute(f"SELECT COALESCE(MAX({key}), 0) FROM {table}").fetchone()[0]),
            )
            if top > 0:
                dst.execute(
                    "SELECT setval(pg_get_serial_sequence(?, ?), GREATEST(?, "
                    "pg_sequence_last_value(pg_get_serial_sequence(?, ?)::regclass)))",
                    (table, key, top, table, key),
                )


def _feed(h: Any, row: Sequence[Any]) -> None:
    """Add one row to a digest, each value with its type (SQLite's and psycopg's types map alike)."""
    for v in row:
        if v is None:
            h.update(b"N;")
        elif isinstance(v, bool | int):
            h.update(b"I%d;" % int(v))
        elif isinstance(v, float):
            h.update(b"F" + v.hex().encode() + b";")
        elif isinstance(v, str):
            data = v.encode()
            h.update(b"S%d:" % len(data) + data)
        else:
            data = bytes(v)
            h.update(b"B%d:" % len(data) + data)


def _digests(
    conn: sqlite3.Connection | PgConnection,
    table: str,
    key: str,
    columns: Sequence[str],
    bounds: Sequence[int],
    batch_size: int,
) -> list[tuple[int, str]]:
    """(rows, sha256) of each chunk: chunk i holds the keys in (bounds[i-1], bounds[i]], the last one
    those past every bound."""
    hashes = [hashlib.sha256() for _ in range(len(bounds) + 1)]
    counts = [0] * len(hashes)
    for rows in _pages(conn, table, key, columns, batch_size):
        for row in rows:
            i = bisect.bisect_left(bounds, int(row[0]))
            _feed(hashes[i], row)
            counts[i] += 1
    return [(n, h.hexdigest()) for n, h in zip(counts, hashes, strict=True)]


def _reconcile(
    src: sqlite3.Connection,
    dst: PgConnection,
    table: str,
    key: str,
    columns: Sequence[str],
    keys: Sequence[int],
    batch_size: int,
    summary: MigrationSummary,
) -> None:
    """Compare the table chunk by chunk, rewrite the target's chunks that differ from the source (rows
    changed or deleted there since an earlier run), then record what still differs."""
    bounds = list(keys[batch_size - 1 :: batch_size])
    if keys and (not bounds or bounds[-1] != keys[-1]):
        bounds.append(keys[-1])
    want = _digests(src, table, key, columns, bounds, batch_size)
    have = _digests(dst, table, key, columns, bounds, batch_size)
    wrong = [i for i, (a, b) in enumerate(zip(want, have, strict=True)) if a != b]
    summary.rewritten[table] = 0
    for i in wrong:
        lo = bounds[i - 1] if i > 0 else None
        hi = bounds[i] if i < len(bounds) else None
        with _txn(dst):
            where, args = _range(key, lo, hi)
            dst.execute(f"DELETE FROM {table}{where}", args)
            for rows in _pages(src, table, key, columns, batch_size, lo=lo, hi=hi):
                _insert(dst, table, key, columns, rows)
                summary.rewritten[table] += len(rows)
    if wrong:
        log.info(
            "%s: rewrote %d row(s) the source changed since an earlier run", table, summary.rewritten[table]
        )
        have = _digests(dst, table, key, columns, bounds, batch_size)
    n_src, n_dst = sum(n for n, _ in want), sum(n for n, _ in have)
    if n_src != n_dst:
        summary.differences.append(f"{table}: {n_src:,} rows in the source, {n_dst:,} in the database")
    elif want != have:
        differ = sum(1 for a, b in zip(want, have, strict=True) if a != b)
        summary.differences.append(f"{table}: the rows of {differ} chunk(s) of {batch_size} differ")


def _verify_meta_and_sequences(
    src: sqlite3.Connection, dst: PgConnection, meta: dict[str, str], summary: MigrationSummary
) -> None:
    have = dict(dst.execute("SELECT key, value FROM gallery_meta").fetchall())
    have.pop(MIGRATED_FROM, None)
    if have != meta:
        keys = sorted(k for k in set(have) | set(meta) if have.get(k) != meta.get(k))
        summary.differences.append(f"gallery_meta differs in {', '.join(keys)}")
    changes = int(dst.execute("SELECT COUNT(*) FROM changes").fetchone()[0])
    if changes:
        summary.differences.append(f"the database was written to during the migration ({changes} change(s))")
    given = dict(src.execute("SELECT name, seq FROM sqlite_sequence").fetchall())
    for table, key in TABLES:
        if table not in IDENTITY_TABLES or not int(given.get(table) or 0):
            continue
        last = dst.execute(
            "SELECT pg_sequence_last_value(pg_get_serial_sequence(?, ?)::regclass)", (table, key)
        ).fetchone()[0]
        if last is None or int(last) < int(given[table]):
            summary.differences.append(f"{table}: the id sequence is at {last}, below {given[table]}")


# ---------------------------------------------------------------- originals
def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _copy_blobs(
    src: sqlite3.Connection,
    source_images: Path,
    target_images: Path,
    summary: MigrationSummary,
    progress: bool,
) -> None:
    """Every original the rows reference, into ``target_images`` (the same folder: only checked)."""
    shas = [
        str(r[0])
        for r in src.execute(
            "SELECT DISTINCT blob_sha256 FROM images WHERE blob_sha256 IS NOT NULL ORDER BY blob_sha256"
        )
    ]
    if target_images != source_images:  # the source's own folder is left as it is
        make_private_dir(target_images)
    for sha in tqdm(shas, desc="originals", unit="file", disable=not progress):
        target = blob_path(target_images, sha)
        if target.is_file() and _sha256_of(target) == sha:
            summary.blobs_present += 1
            continue
        source = blob_path(source_images, sha)
        try:
            data = source.read_bytes()
        except FileNotFoundError:
            summary.blobs_missing.append(sha)
            continue
        if hashlib.sha256(data).hexdigest() != sha:
            summary.blobs_damaged.append(sha)
            continue
        new_dir = not target.parent.exists()
        try:
            make_private_dir(target.parent)
            atomic_write_bytes(target, data)
            if new_dir:
                fsync_dir(target_images)
            copied = _sha256_of(target)
        except OSError as exc:
            raise MigrationError(
                f"cannot write the original {target}: {exc}; the rows are copied, run migrate again to "
                "copy the originals left"
            ) from exc
        if copied != sha:
            summary.differences.append(f"the copy of original {sha} in {target_images} does not match it")
        else:
            summary.blobs_copied += 1
    if summary.blobs_missing or summary.blobs_damaged:
        log.warning(
            "%d original(s) missing and %d damaged in %s (as they were, not copied; `cxr-reid check` lists "
            "them), e.g. %s",
            len(summary.blobs_missing),
            len(summary.blobs_damaged),
            source_images,
            (summary.blobs_missing + summary.blobs_damaged)[0],
        )
