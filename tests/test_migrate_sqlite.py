"""``cxr-reid migrate`` (index/migrate_sqlite.py): a real SQLite gallery moved into a real PostgreSQL
database (the ``database_url`` fixture), then opened there as a replica would open it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psycopg
import pytest

from index import Gallery, NewImage
from index.alerts import NewAlert
from index.migrate_sqlite import MIGRATED_FROM, MigrationError, migrate_sqlite

DIM = 16
MODEL = "m"


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def sqlite_gallery(data: Path, n: int = 12) -> np.ndarray:
    """A gallery with originals, tags, an alert, a calibration, a gap in its ids (one deleted in the
    middle) and a deleted last image (SQLite remembers its id); returns the vectors added."""
    x = unit(np.random.default_rng(0), n)
    images = [
        NewImage(
            patient_id=f"p{i % 4}",
            collection="default" if i % 3 else "other",
            blob=f"original {i}".encode(),
            view="PA",
            tags={"site": "a", "i": str(i)},
        )
        for i in range(n)
    ]
    alerts = [None] * n
    alerts[2] = NewAlert(kind="matches_other_patient", message="looks like p1", score=0.91, other_image_id=1)
    with Gallery(data, dim=DIM, model_id=MODEL, autosave_seconds=None) as g:
        g.add_with_alerts(x, images, alerts)
        g.save_calibration({"threshold": 0.5, "far": 0.001})
        assert g.delete_image(5) and g.delete_image(n)
    return x


def contents(data: Path) -> dict[str, bytes]:
    """Every file of a data dir but SQLite's WAL index files (a read-only reader of a WAL database
    creates them)."""
    return {
        str(p.relative_to(data)): p.read_bytes()
        for p in data.rglob("*")
        if p.is_file() and not p.name.endswith(("-wal", "-shm"))
    }


def open_pg(url: str, root: Path, name: str = "r1") -> Gallery:
    return Gallery(
        root / name, dim=DIM, model_id=MODEL, database_url=url, blob_dir=root / "blobs", autosave_seconds=None
    )


def rows(url: str, sql: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()


def test_migrated_gallery_serves_the_same(database_url: str, tmp_path: Path) -> None:
    x = sqlite_gallery(tmp_path / "data")
    before = contents(tmp_path / "data")
    summary = migrate_sqlite(tmp_path / "data", database_url, blob_dir=tmp_path / "blobs", batch_size=4)
    assert summary.verified, summary.differences
    assert summary.rows == {"images": 10, "reindex_staging": 0, "calibrations": 1, "alerts": 1}
    assert (summary.blobs_copied, summary.blobs_present, summary.blobs_missing) == (10, 0, [])
    assert contents(tmp_path / "data") == before  # the source is only read
    with (
        Gallery(tmp_path / "data", dim=DIM, model_id=MODEL, autosave_seconds=None) as old,
        open_pg(database_url, tmp_path) as new,
    ):
        assert [r.image_id for r in new.list_images()[0]] == [r.image_id for r in old.list_images()[0]]
        assert 5 not in [r.image_id for r in new.list_images()[0]]
        for i in range(12):
            hits = [(m.record.image_id, m.score) for m in new.search(x[i], k=5, collection=None)]
            assert hits == [(m.record.image_id, m.score) for m in old.search(x[i], k=5, collection=None)]
        for rec in old.list_images()[0]:
            got = new.get(rec.image_id)
            assert (got.patient_id, got.collection, got.tags, got.sha256, got.created_at) == (
                rec.patient_id,
                rec.collection,
                rec.tags,
                rec.sha256,
                rec.created_at,
            )
            assert Path(got.stored_path).read_bytes() == Path(rec.stored_path).read_bytes()
            assert np.array_equal(new._store.get_vector(rec.image_id), old._store.get_vector(rec.image_id))
        assert new.list_alerts()[0] == old.list_alerts()[0]
        assert new.site_calibration() == old.site_calibration()
        assert new.generation == old.generation
        # ids never reused: the deleted last image's (12) included
        added = new.add(x[:1], [NewImage(patient_id="new", blob=b"new original")])
        assert added[0].image_id == 13
        assert new.save_calibration({"threshold": 0.6}) == 2
    meta = dict(rows(database_url, "SELECT key, value FROM gallery_meta"))
    assert meta[MIGRATED_FROM] == meta["instance_id"]


def test_an_interrupted_migration_resumes(database_url: str, tmp_path: Path) -> None:
    sqlite_gallery(tmp_path / "data")

    def stop(table: str, n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        migrate_sqlite(
            tmp_path / "data", database_url, blob_dir=tmp_path / "blobs", batch_size=4, on_batch=stop
        )
    assert rows(database_url, "SELECT image_id FROM images ORDER BY 1") == [(1,), (2,), (3,), (4,)]
    summary = migrate_sqlite(tmp_path / "data", database_url, blob_dir=tmp_path / "blobs", batch_size=4)
    assert summary.verified, summary.differences
    assert summary.copied["images"] == 6 and sum(summary.rewritten.values()) == 0
    ids = [r[0] for r in rows(database_url, "SELECT image_id FROM images ORDER BY 1")]
    assert ids == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    # a source changed since (a relabel, a deletion, a new image): the next run brings the target along
    with Gallery(tmp_path / "data", dim=DIM, model_id=MODEL, autosave_seconds=None) as g:
        g.set_patient_id(2, "moved")
        g.delete_image(3)
        g.add(unit(np.random.default_rng(1), 1), [NewImage(patient_id="late", blob=b"late")])
    again = migrate_sqlite(tmp_path / "data", database_url, blob_dir=tmp_path / "blobs", batch_size=4)
    assert again.verified, again.differences
    assert again.copied["images"] == 1 and again.blobs_present == 9 and again.blobs_copied == 1
    assert rows(database_url, "SELECT patient_id FROM images WHERE image_id = 2") == [("moved",)]
    assert rows(database_url, "SELECT COUNT(*), MAX(image_id) FROM images") == [(10, 13)]


def test_a_database_holding_another_gallery_is_refused(database_url: str, tmp_path: Path) -> None:
    sqlite_gallery(tmp_path / "data")
    with open_pg(database_url, tmp_path, "other") as other:
        other.add(unit(np.random.default_rng(2), 2), [NewImage(patient_id="x"), NewImage(patient_id="y")])
    before = (
        rows(database_url, "SELECT * FROM images ORDER BY 1"),
        rows(database_url, "SELECT * FROM gallery_meta"),
    )
    with pytest.raises(MigrationError, match="already holds another gallery.*nothing was written"):
        migrate_sqlite(tmp_path / "data", database_url, blob_dir=tmp_path / "blobs")
    after = (
        rows(database_url, "SELECT * FROM images ORDER BY 1"),
        rows(database_url, "SELECT * FROM gallery_meta"),
    )
    assert after == before


def test_missing_originals_are_counted_not_fatal(database_url: str, tmp_path: Path) -> None:
    sqlite_gallery(tmp_path / "data")
    sha = hashlib.sha256(b"original 0").hexdigest()
    (tmp_path / "data" / "images" / sha[:2] / sha).unlink()
    summary = migrate_sqlite(tmp_path / "data", database_url)  # the replicas mount data/images itself
    assert summary.verified and summary.blobs_missing == [sha]
    assert (summary.blobs_copied, summary.blobs_present) == (0, 9)


def test_cli_end_to_end(database_url: str, tmp_path: Path) -> None:
    sqlite_gallery(tmp_path / "data")
    command = [sys.executable, "-m", "app.cli", "migrate", "--from", str(tmp_path / "data"), "--no-progress"]
    env = {**os.environ, "CXR_REID_DATABASE_URL": database_url}
    done = subprocess.run(
        [*command, "--to", database_url, "--blob-dir", str(tmp_path / "blobs")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "migrated gallery" in done.stderr and "rows images 10, reindex_staging 0" in done.stderr
    assert "originals 10 copied, 0 already there" in done.stderr and "verified in" in done.stderr
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)  # URL from the env
    assert rerun.returncode == 0, rerun.stderr
    assert "(0 written by this run)" in rerun.stderr
    other = tmp_path / "other"
    sqlite_gallery(other)
    refused = subprocess.run(
        [*command[:4], "--from", str(other), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert refused.returncode == 2
    assert "already holds another gallery" in refused.stderr and "Traceback" not in refused.stderr
