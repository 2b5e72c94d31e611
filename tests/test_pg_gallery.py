"""The gallery on PostgreSQL (index/pg_store.py, index/follow.py): a real private cluster
(app/local_postgres.py), several Gallery objects on one database as several replicas would be."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest

from index import Gallery, GalleryDuplicateError, GalleryNotFoundError, NewImage
from index.pg_store import SCHEMA_VERSION, PgConnection, migrate, schema_version

DIM = 16
MODEL = "test-model"


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def open_replica(url: str, root: Path, name: str, **kw) -> Gallery:
    return Gallery(
        root / name,
        dim=DIM,
        model_id=MODEL,
        database_url=url,
        blob_dir=root / "blobs",
        follow_poll_seconds=0.2,
        autosave_seconds=None,
        **kw,
    )


def wait_for(predicate, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_a_write_through_one_replica_is_searchable_on_another(database_url: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = unit(rng, 20)
    with open_replica(database_url, tmp_path, "r1") as r1, open_replica(database_url, tmp_path, "r2") as r2:
        records = r1.add(x[:10], [NewImage(patient_id=f"p{i}", blob=f"img{i}".encode()) for i in range(10)])
        assert [m.record.image_id for m in r1.search(x[3], k=1)] == [records[3].image_id]
        # r2 hears of it through LISTEN/NOTIFY (or its poll) without any call
        assert wait_for(lambda: len(r2.search(x[3], k=1)) == 1)
        assert r2.search(x[3], k=1)[0].record.image_id == records[3].image_id
        assert r2.search(x[3], k=1)[0].record.stored_path == records[3].stored_path  # shared blob store
        # deletes and relabels follow too
        assert r2.delete_image(records[3].image_id)
        assert wait_for(lambda: all(m.record.image_id != records[3].image_id for m in r1.search(x[3], k=3)))
        r1.set_patient_id(records[4].image_id, "moved")
        assert r2.get(records[4].image_id).patient_id == "moved"
        assert wait_for(lambda: r2.replication()["behind"] == 0)
        status = r2.replication()
        assert status["applied_change"] == status["latest_change"] >= 3 and status["listening"]
        assert r1.is_consistent() and r2.is_consistent()


def test_a_new_replica_starts_from_the_database(database_url: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = unit(rng, 30)
    with open_replica(database_url, tmp_path, "r1") as r1:
        r1.add(x, [NewImage(patient_id=f"p{i % 7}") for i in range(30)])
    with open_replica(database_url, tmp_path, "r3") as r3:
        assert len(r3) == 30 and r3.is_consistent()
        assert r3.search(x[5], k=1)[0].score == pytest.approx(1.0, abs=1e-5)


def test_concurrent_writers_store_each_image_once(database_url: str, tmp_path: Path) -> None:
    """Two replicas enrolling the same DICOM instance at once: the database's unique key stores it once."""
    rng = np.random.default_rng(2)
    x = unit(rng, 40)
    errors: list[Exception] = []
    with open_replica(database_url, tmp_path, "r1") as r1, open_replica(database_url, tmp_path, "r2") as r2:

        def enrol(g: Gallery, offset: int) -> None:
            for i in range(20):
                try:
                    g.add(x[i : i + 1], [NewImage(patient_id="p", sop_instance_uid=f"1.2.3.{i}")])
                except GalleryDuplicateError as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=enrol, args=(g, o)) for g, o in ((r1, 0), (r2, 0))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(r1) == 20  # each UID once
        assert len(errors) == 20  # and every loser was told
        assert wait_for(lambda: r1.catch_up() == 0 and r2.catch_up() == 0)
        assert r1.is_consistent() and r2.is_consistent()


def test_calibration_change_reaches_other_replicas(database_url: str, tmp_path: Path) -> None:
    seen: list[str] = []
    with open_replica(database_url, tmp_path, "r1") as r1, open_replica(database_url, tmp_path, "r2") as r2:
        r2.on_change(seen.append)
        r1.save_calibration({"thresholds": {"0.001": 0.5}})
        assert wait_for(lambda: seen == ["calibration"])
        assert r2.site_calibration()["thresholds"] == {"0.001": 0.5}


def test_migrations_are_versioned_and_idempotent(database_url: str) -> None:
    conn = PgConnection(psycopg.connect(database_url, autocommit=True), database_url)
    try:
        assert schema_version(conn) == 0
        assert migrate(conn) == ["0001_initial.sql"]
        assert migrate(conn) == []
        assert schema_version(conn) == SCHEMA_VERSION
        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", (SCHEMA_VERSION + 1, "x"))
        with pytest.raises(Exception, match="newer than this software"):
            migrate(conn)
    finally:
        conn.close()


def test_a_job_that_needs_a_gallery_creates_none(database_url: str, tmp_path: Path) -> None:
    with pytest.raises(GalleryNotFoundError, match="nothing was created"):
        open_replica(database_url, tmp_path, "r1", create=False)
    conn = psycopg.connect(database_url, autocommit=True)
    try:
        assert conn.execute("SELECT to_regclass('images')").fetchone()[0] is None
    finally:
        conn.close()
