"""Gallery tests: real FAISS, real SQLite files under tmp_path, real subprocesses for locking and kill -9."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from index import (
    DuplicatePair,
    Gallery,
    GalleryError,
    GalleryLockedError,
    GalleryModelMismatchError,
    GalleryValidationError,
    ImageRecord,
    NewImage,
    cluster_pairs,
)
from index.faiss_index import VectorIndex, auto_layout, auto_nprobe

DIM = 16
REPO = Path(__file__).resolve().parents[1]


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def blob_files(data_dir: Path) -> list[Path]:
    images = data_dir / "images"
    return sorted(p for p in images.rglob("*") if p.is_file()) if images.exists() else []


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def gallery(tmp_path: Path):
    g = Gallery(tmp_path / "g", dim=DIM, model_id="m1")
    yield g
    g.close()


def enrol(g: Gallery, x: np.ndarray, **kw) -> list[ImageRecord]:
    return g.add(x, [NewImage(**kw) for _ in range(len(x))])


# ------------------------------------------------------------------ add / get / list
def test_add_get_list_and_pagination(gallery: Gallery, rng):
    x = unit(rng, 25)
    images = [
        NewImage(
            patient_id=f"p{i % 3}",
            blob=f"original-{i}".encode(),
            view="PA",
            study_date="20200101",
            split="train",
            sop_instance_uid=f"1.2.{i}",
            tags={"site": "A", "i": str(i)},
        )
        for i in range(25)
    ]
    recs = gallery.add(x * 3.0, images)  # not unit: the gallery re-normalises
    assert [r.image_id for r in recs] == sorted(r.image_id for r in recs)
    assert len(gallery) == 25

    r = gallery.get(recs[4].image_id)
    assert r == recs[4]
    assert r.patient_id == "p1" and r.collection == "default" and r.model_id == "m1"
    assert r.tags == {"site": "A", "i": "4"} and r.view == "PA" and r.sop_instance_uid == "1.2.4"
    assert datetime.fromisoformat(r.created_at).utcoffset().total_seconds() == 0
    assert Path(r.stored_path).is_absolute() and Path(r.stored_path).read_bytes() == b"original-4"
    assert r.sha256 == Path(r.stored_path).name
    assert gallery.find_by_sha256(r.sha256).image_id == r.image_id
    assert gallery.find_by_sha256(r.sha256, collection="other") is None
    np.testing.assert_allclose(gallery.get_vector(r.image_id), x[4], atol=1e-6)
    assert gallery.get(10_000) is None and gallery.get_vector(10_000) is None

    page, total = gallery.list_images(offset=10, limit=10)
    assert total == 25 and [p.image_id for p in page] == [q.image_id for q in recs[10:20]]
    page, total = gallery.list_images(patient_id="p2", limit=3)
    assert total == 8 and len(page) == 3 and all(p.patient_id == "p2" for p in page)
    assert gallery.list_images(collection="nope") == ([], 0)

    recs_p0, vecs_p0 = gallery.patient_images("p0")
    assert [q.patient_id for q in recs_p0] == ["p0"] * 9 and vecs_p0.shape == (9, DIM)
    np.testing.assert_allclose(vecs_p0, x[0::3], atol=1e-6)
    assert gallery.patient_images("nobody")[1].shape == (0, DIM)
    assert gallery.is_consistent()


def test_find_by_sop_instance_uid_and_its_index(tmp_path: Path, rng):
    """STOW-RS idempotency: the lookup by SOPInstanceUID, per collection, on an indexed column that
    a gallery made before the index gets when it is opened."""
    import sqlite3

    g = Gallery(tmp_path / "g", dim=DIM, model_id="m1")
    first = g.add(unit(rng, 2), [NewImage(sop_instance_uid="1.2.3"), NewImage(sop_instance_uid="1.2.3")])
    g.add(unit(rng, 1), [NewImage(sop_instance_uid="1.2.3", collection="other")])
    assert g.find_by_sop_instance_uid("1.2.3").image_id == first[0].image_id
    assert g.find_by_sop_instance_uid("1.2.3", collection="other").collection == "other"
    assert g.find_by_sop_instance_uid("1.2.4") is None
    assert g.find_by_sop_instance_uid("1.2.3", collection="third") is None
    g.close()
    db = tmp_path / "g" / "gallery.sqlite"
    with sqlite3.connect(db) as conn:  # a gallery of an earlier version: no such index
        conn.execute("DROP INDEX images_sop_instance")
    g = Gallery(tmp_path / "g", dim=DIM, model_id="m1")
    assert g.find_by_sop_instance_uid("1.2.3").image_id == first[0].image_id
    g.close()
    with sqlite3.connect(db) as conn:
        plan = conn.execute("EXPLAIN QUERY PLAN SELECT * FROM images WHERE sop_instance_uid = '1'").fetchall()
    assert "images_sop_instance" in str(plan)


def test_search_order_scores_threshold_exclude(gallery: Gallery, rng):
    x = unit(rng, 200)
    recs = enrol(gallery, x)
    ids = np.array([r.image_id for r in recs])
    q = unit(rng, 1)[0]
    expected = x @ q
    order = np.argsort(-expected)

    hits = gallery.search(q, k=10)
    assert [h.record.image_id for h in hits] == ids[order[:10]].tolist()
    np.testing.assert_allclose([h.score for h in hits], expected[order[:10]], atol=1e-5)

    thr = float(expected[order[4]])
    hits = gallery.search(q, k=50, threshold=thr)
    assert len(hits) == 5 and all(h.score >= thr for h in hits)

    skip = ids[order[:3]].tolist()
    hits = gallery.search(q, k=5, exclude_ids=skip)
    assert [h.record.image_id for h in hits] == ids[order[3:8]].tolist()

    self_hit = gallery.search(x[7] * 2, k=1)[0]  # query need not be unit either
    assert self_hit.record.image_id == ids[7] and self_hit.score == pytest.approx(1.0, abs=1e-5)
    assert len(gallery.search(q, k=1000)) == 200
    assert gallery.search(q, k=0) == []


def test_empty_gallery_and_bad_queries(gallery: Gallery):
    assert gallery.search(np.ones(DIM), k=5) == []
    assert gallery.duplicates(0.5) == []
    with pytest.raises(GalleryValidationError):
        gallery.search(np.ones(DIM + 1))
    with pytest.raises(GalleryValidationError):
        gallery.search(np.zeros(DIM))
    with pytest.raises(GalleryValidationError):
        gallery.search(np.full(DIM, np.nan))


def test_collections_are_isolated(gallery: Gallery, rng):
    xa, xb = unit(rng, 30), unit(rng, 30)
    ra = enrol(gallery, xa, collection="a")
    rb = enrol(gallery, xb, collection="b")
    ids_a = {r.image_id for r in ra}
    ids_b = {r.image_id for r in rb}

    hits = gallery.search(xb[0], k=10, collection="a")
    assert len(hits) == 10 and {h.record.image_id for h in hits} <= ids_a
    hits = gallery.search(xb[0], k=10, collection="b")
    assert hits[0].record.image_id == rb[0].image_id and {h.record.image_id for h in hits} <= ids_b
    assert gallery.search(xb[0], k=10) == []  # nothing in "default"
    hits = gallery.search(xb[0], k=60, collection=None)
    assert {h.record.image_id for h in hits} == ids_a | ids_b
    assert gallery.collections() == {"a": 30, "b": 30}
    # a later add to one collection is visible there (selector cache invalidated) and not in the other
    (new,) = enrol(gallery, xa[:1], collection="b")
    assert gallery.search(xa[0], k=1, collection="b")[0].record.image_id == new.image_id
    assert gallery.search(xa[0], k=1, collection="a")[0].record.image_id == ra[0].image_id


def test_collection_search_survives_faiss_torch_utils_patch(gallery: Gallery, rng):
    """pytorch-metric-learning imports faiss.contrib.torch_utils, which replaces Index.search
    process-wide with a version without ``params``: selector searches must still work."""
    import faiss.contrib.torch_utils  # noqa: F401  (the import is the patch)

    xa, xb = unit(rng, 20), unit(rng, 20)
    ra = enrol(gallery, xa, collection="a")
    enrol(gallery, xb, collection="b")
    hits = gallery.search(xa[3], k=5, collection="a")
    assert hits[0].record.image_id == ra[3].image_id
    assert {h.record.image_id for h in hits} <= {r.image_id for r in ra}


def test_delete_image_and_patient(gallery: Gallery, rng):
    x = unit(rng, 12)
    images = [NewImage(patient_id=f"p{i % 3}", blob=f"b{i}".encode()) for i in range(12)]
    images[11].blob = b"b0"  # same original as image 0 under another patient
    recs = gallery.add(x, images)
    shared = Path(recs[0].stored_path)
    assert recs[11].stored_path == str(shared) and len(blob_files(gallery.data_dir)) == 11

    assert gallery.delete_image(recs[0].image_id) is True
    assert gallery.delete_image(recs[0].image_id) is False
    assert shared.exists()  # image 11 still uses it
    assert gallery.get(recs[0].image_id) is None
    assert all(h.record.image_id != recs[0].image_id for h in gallery.search(x[0], k=12))

    assert gallery.delete_patient("p1") == 4
    assert gallery.delete_patient("p1") == 0
    left = {h.record.image_id for h in gallery.search(x[1], k=12)}
    assert left == {r.image_id for r in recs} - {recs[0].image_id} - {r.image_id for r in recs[1::3]}
    assert not Path(recs[1].stored_path).exists() and not Path(recs[4].stored_path).exists()

    assert gallery.delete_patient("p2", collection="elsewhere") == 0
    assert gallery.delete_patient("p2") == 4  # includes image 11, the last user of b0
    assert not shared.exists()
    assert len(gallery) == 3 and gallery.is_consistent()
    assert len(blob_files(gallery.data_dir)) == 3


def test_remove_orphan_blobs(gallery: Gallery, rng):
    (rec,) = gallery.add(unit(rng, 1), [NewImage(blob=b"kept")])
    orphan = gallery.data_dir / "images" / ("ab" + "0" * 62)[:2] / ("ab" + "0" * 62)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"left by a crash before commit")
    (orphan.parent / ".abc.123.tmp").write_bytes(b"partial")
    assert gallery.remove_orphan_blobs() == 2
    assert blob_files(gallery.data_dir) == [Path(rec.stored_path)]


# ------------------------------------------------------------------ persistence
def test_reopen_gives_same_results(tmp_path: Path, rng, caplog):
    d = tmp_path / "g"
    x, q = unit(rng, 100), unit(rng, 5)
    with Gallery(d, dim=DIM, model_id="m1") as g:
        enrol(g, x, patient_id="p")
        g.delete_image(50)
        before = [[(h.record.image_id, h.score) for h in g.search(v, k=5)] for v in q]
    caplog.set_level(logging.INFO, logger="index")
    with Gallery(d, dim=DIM, model_id="m1") as g:
        after = [[(h.record.image_id, h.score) for h in g.search(v, k=5)] for v in q]
        assert g.is_consistent() and len(g) == 99
    assert after == before
    assert "built FAISS index" not in caplog.text  # the saved file was reused, not rebuilt


@pytest.mark.parametrize("damage", ["missing", "corrupt", "truncated", "stale", "sidecar"])
def test_faiss_file_damaged_or_stale_is_rebuilt(tmp_path: Path, rng, caplog, damage):
    d = tmp_path / "g"
    x = unit(rng, 60)
    with Gallery(d, dim=DIM, model_id="m1") as g:
        enrol(g, x[:40])
    old = tmp_path / "old"
    old.mkdir()
    for name in ("faiss.index", "faiss.index.json"):
        shutil.copy(d / name, old / name)
    with Gallery(d, dim=DIM, model_id="m1") as g:
        enrol(g, x[40:])
        g.delete_image(3)
        expected = [h.record.image_id for h in g.search(x[45], k=5)]

    index_file = d / "faiss.index"
    if damage == "missing":
        index_file.unlink()
    elif damage == "corrupt":
        data = bytearray(index_file.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = os.urandom(64)
        index_file.write_bytes(bytes(data))
    elif damage == "truncated":
        index_file.write_bytes(index_file.read_bytes()[:100])
    elif damage == "stale":  # an older generation's index next to newer rows (e.g. crash before save)
        for name in ("faiss.index", "faiss.index.json"):
            shutil.copy(old / name, d / name)
    elif damage == "sidecar":
        (d / "faiss.index.json").write_text("{not json")

    caplog.set_level(logging.INFO, logger="index")
    with Gallery(d, dim=DIM, model_id="m1") as g:
        assert "built FAISS index" in caplog.text
        assert g.is_consistent() and len(g) == 59
        assert [h.record.image_id for h in g.search(x[45], k=5)] == expected
    tag = json.loads((d / "faiss.index.json").read_text())
    assert tag["count"] == 59  # the rebuilt index was saved with the current tag


# ------------------------------------------------------------------ all or nothing
@pytest.mark.parametrize(
    "make",
    [
        lambda x: np.where(np.arange(DIM) == 3, np.nan, x),
        lambda x: x[:, :-1],
        lambda x: np.zeros_like(x),
        lambda x: x[:-1],
        lambda x: np.where(np.arange(DIM) == 0, np.inf, x),
    ],
    ids=["nan", "wrong-dim", "zero-norm", "count-mismatch", "inf"],
)
def test_add_rejects_bad_vectors_and_leaves_nothing(gallery: Gallery, rng, make):
    x = unit(rng, 4)
    images = [NewImage(patient_id="p", blob=f"b{i}".encode()) for i in range(4)]
    with pytest.raises(GalleryValidationError):
        gallery.add(make(x), images)
    assert len(gallery) == 0 and blob_files(gallery.data_dir) == []
    assert gallery._live.current.ntotal == 0 and gallery.is_consistent()


def test_add_rejects_bad_images(gallery: Gallery, rng):
    x = unit(rng, 1)
    for bad in (
        NewImage(patient_id=""),
        NewImage(collection=""),
        NewImage(sha256="xyz"),
        NewImage(blob=b""),
    ):
        with pytest.raises(GalleryValidationError):
            gallery.add(x, [bad])
    with pytest.raises(GalleryValidationError):
        gallery.add(x, ["not an image"])  # type: ignore[list-item]
    assert len(gallery) == 0 and blob_files(gallery.data_dir) == []


def test_add_failure_inside_transaction_rolls_back_rows_blobs_and_faiss(gallery: Gallery, rng, monkeypatch):
    (kept,) = gallery.add(unit(rng, 1), [NewImage(blob=b"kept")])
    calls = {"n": 0}
    real = Gallery._insert_row

    def flaky(self, conn, row, vector, created_at):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (simulated)")
        return real(self, conn, row, vector, created_at)

    monkeypatch.setattr(Gallery, "_insert_row", flaky)
    images = [NewImage(blob=b"kept"), NewImage(blob=b"new-1"), NewImage(blob=b"new-2")]
    with pytest.raises(GalleryError, match="disk full"):
        gallery.add(unit(rng, 3), images)
    assert len(gallery) == 1 and gallery._live.current.ntotal == 1 and gallery.is_consistent()
    assert blob_files(gallery.data_dir) == [Path(kept.stored_path)]  # new blobs gone, old one kept
    monkeypatch.undo()
    recs = gallery.add(unit(rng, 3), images)  # and the gallery still works
    assert [r.image_id for r in recs] == [kept.image_id + i for i in range(1, 4)]  # no ids burnt
    assert len(blob_files(gallery.data_dir)) == 3


# ------------------------------------------------------------------ model ids and reindex
def test_model_mismatch_then_reindex(tmp_path: Path, rng):
    d = tmp_path / "g"
    x = unit(rng, 30)
    with Gallery(d, dim=DIM, model_id="m1") as g:
        recs = g.add(x, [NewImage(patient_id=f"p{i}", source_path=f"/data/{i}.png") for i in range(30)])
    with pytest.raises(GalleryModelMismatchError, match="reindex"):
        Gallery(d, dim=8, model_id="m2")
    # the failed open released everything: the old model still opens
    Gallery(d, dim=DIM, model_id="m1").close()

    proj = rng.standard_normal((DIM, 8)).astype(np.float32)
    seen: list[list[str]] = []
    progress: list[tuple[int, int]] = []

    def embed(records: list[ImageRecord]) -> np.ndarray:
        seen.append([r.source_path for r in records])
        return np.stack([x[int(Path(r.source_path).stem)] @ proj for r in records])

    with Gallery(d, dim=8, model_id="m2", allow_model_mismatch=True) as g:
        assert g.stored_model_id == "m1"
        with pytest.raises(GalleryModelMismatchError):
            g.search(np.ones(8))
        with pytest.raises(GalleryModelMismatchError):
            g.add(np.ones((1, 8)), [NewImage()])
        assert (
            g.reindex(embed, model_id="m2", batch_size=7, progress=lambda a, b: progress.append((a, b))) == 30
        )
        assert len(seen) == 5 and sum(map(len, seen)) == 30
        assert progress[-1] == (30, 30)
        assert g.stored_model_id == "m2" and g.is_consistent()
        assert {r.model_id for r in g.list_images(limit=100)[0]} == {"m2"}
        hit = g.search(x[5] @ proj, k=1)[0]
        assert hit.record.image_id == recs[5].image_id and hit.score == pytest.approx(1.0, abs=1e-5)
    with Gallery(d, dim=8, model_id="m2") as g:  # no flag needed any more
        assert g.is_consistent() and len(g) == 30


def test_empty_gallery_switches_model_freely(tmp_path: Path):
    Gallery(tmp_path / "g", dim=DIM, model_id="m1").close()
    with Gallery(tmp_path / "g", dim=8, model_id="m2") as g:
        assert g.stored_model_id == "m2"


def test_reindex_resumes_after_interruption(tmp_path: Path, rng):
    x = unit(rng, 20)
    with Gallery(tmp_path / "g", dim=DIM, model_id="m1") as g:
        enrol(g, x)
    calls = {"n": 0, "rows": 0}

    def embed(records):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("embedder crashed")
        calls["rows"] += len(records)
        return np.stack([g.get_vector(r.image_id)[::-1] for r in records])

    with Gallery(tmp_path / "g", dim=DIM, model_id="m2", allow_model_mismatch=True) as g:
        with pytest.raises(RuntimeError, match="embedder crashed"):
            g.reindex(embed, model_id="m2", batch_size=5)
        assert g.stored_model_id == "m1"  # nothing swapped yet
    with Gallery(tmp_path / "g", dim=DIM, model_id="m2", allow_model_mismatch=True) as g:
        assert g.reindex(embed, model_id="m2", batch_size=5) == 20
        assert calls["rows"] == 20  # the 10 staged before the crash were not embedded again
        assert g.is_consistent()
        np.testing.assert_allclose(g.get_vector(1), x[0][::-1], atol=1e-6)


# ------------------------------------------------------------------ duplicates
def test_duplicates_conflicts_and_clusters(gallery: Gallery, rng):
    base = unit(rng, 40)
    noise = lambda v: v + 0.02 * rng.standard_normal(DIM).astype(np.float32)  # noqa: E731
    extra = np.stack([noise(base[0]), noise(base[1]), noise(base[2]), noise(base[2]), noise(base[3])])
    pids = [f"p{i}" for i in range(40)]
    pids[3] = None  # unknown identity
    x = np.concatenate([base, extra])
    extra_pids = ["p0", "px", "p2", "p2", "p9"]  # same / conflict / cluster of 3 / unknown vs known
    recs = gallery.add(x, [NewImage(patient_id=p) for p in pids + extra_pids])
    rid = [r.image_id for r in recs]

    pairs = gallery.duplicates(0.95)
    assert all(isinstance(p, DuplicatePair) and p.a.image_id < p.b.image_id for p in pairs)
    found = {(p.a.image_id, p.b.image_id): p for p in pairs}
    want = {(rid[0], rid[40]), (rid[1], rid[41]), (rid[2], rid[42]), (rid[2], rid[43]), (rid[42], rid[43])}
    want.add((rid[3], rid[44]))
    assert set(found) == want
    assert [p.score for p in pairs] == sorted((p.score for p in pairs), reverse=True)
    assert found[(rid[1], rid[41])].conflict is True
    assert found[(rid[0], rid[40])].conflict is False
    assert found[(rid[3], rid[44])].conflict is False  # one side unknown: not a conflict
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected_scores = {k: float(xn[rid.index(k[0])] @ xn[rid.index(k[1])]) for k in want}
    for k, p in found.items():
        assert p.score == pytest.approx(expected_scores[k], abs=1e-5)

    clusters = cluster_pairs(pairs)
    assert clusters[0] == sorted([rid[2], rid[42], rid[43]])
    assert sorted(map(tuple, clusters[1:])) == sorted(
        [(rid[0], rid[40]), (rid[1], rid[41]), (rid[3], rid[44])]
    )
    assert gallery.duplicates(0.95, collection="other") == []
    assert len(gallery.duplicates(0.95, collection=None)) == len(pairs)


# ------------------------------------------------------------------ index factories
@pytest.mark.parametrize("factory", ["IVF4,Flat", "HNSW32"])
def test_ivf_and_hnsw_match_flat_top1(tmp_path: Path, rng, factory):
    x = unit(rng, 300, 32)
    queries = x[:40] + 0.05 * rng.standard_normal((40, 32)).astype(np.float32)
    with Gallery(tmp_path / "flat", dim=32, model_id="m") as flat:
        flat.add(x, [NewImage() for _ in range(300)])
        want = [flat.search(q, k=1)[0].record.image_id for q in queries]
    d = tmp_path / factory.replace(",", "_")
    with Gallery(d, dim=32, model_id="m", index_factory=factory, nprobe=4, ef_search=64) as g:
        g.add(x, [NewImage() for _ in range(300)])
    with Gallery(d, dim=32, model_id="m", index_factory=factory, nprobe=4, ef_search=64) as g:
        assert g.effective_index_factory == factory  # trained from SQLite on save/open
        assert [g.search(q, k=1)[0].record.image_id for q in queries] == want
        # deletes: IVF removes ids, HNSW tombstones them; both hide the image and stay consistent
        g.delete_image(want[0])
        assert g.search(queries[0], k=1)[0].record.image_id != want[0]
        assert g.is_consistent() and len(g) == 299
        (other,) = g.add(x[:1], [NewImage(collection="other")])
        assert [h.record.image_id for h in g.search(x[0], k=3, collection="other")] == [other.image_id]
    with Gallery(d, dim=32, model_id="m", index_factory=factory) as g:
        assert g.is_consistent() and len(g) == 300


def test_ivf_without_enough_vectors_falls_back_to_flat(tmp_path: Path, rng, caplog):
    caplog.set_level(logging.WARNING, logger="index")
    x = unit(rng, 50)
    with Gallery(tmp_path / "g", dim=DIM, model_id="m", index_factory="IVF256,Flat") as g:
        recs = enrol(g, x)
        assert g.effective_index_factory == "Flat"
        assert g.search(x[9], k=1)[0].record.image_id == recs[9].image_id
    with Gallery(tmp_path / "g", dim=DIM, model_id="m", index_factory="IVF256,Flat") as g:
        assert g.effective_index_factory == "Flat" and g.is_consistent()
    assert "Flat" in caplog.text and "IVF256" in caplog.text
    with pytest.raises(GalleryValidationError):
        Gallery(tmp_path / "h", dim=DIM, model_id="m", index_factory="NotAnIndex")


def test_auto_index_is_flat_while_small_and_ivf_above_the_threshold(tmp_path: Path, rng, caplog):
    caplog.set_level(logging.INFO, logger="index")
    x = unit(rng, 400)
    d = tmp_path / "g"
    with Gallery(d, dim=DIM, model_id="m", auto_flat_max=300) as g:
        recs = enrol(g, x[:299])
        assert g.effective_index_factory == "Flat" and not g.index_rebuilding
        recs += enrol(g, x[299:])  # 400 >= 300: rebuilt as IVF in the background
        assert g.wait_for_rebuild(30)
        assert g.effective_index_factory == auto_layout(400, 300) == "IVF8,Flat"
        assert auto_layout(99_999) == "IVF1024,Flat" and auto_nprobe("IVF1024,Flat") == 64
        # from AUTO_REFINE_MIN (1e5): fast-scan PQ re-ranked exactly (tests/test_faiss_refine.py)
        assert auto_layout(1_000_000) == "IVF4096,PQ256x4fs,RFlat" and auto_nprobe("IVF4096,Flat") == 128
        assert g.is_consistent()
        assert [g.search(x[i], k=1)[0].record.image_id for i in (3, 333)] == [
            recs[3].image_id,
            recs[333].image_id,
        ]
    caplog.clear()
    with Gallery(d, dim=DIM, model_id="m", auto_flat_max=300) as g:  # the saved IVF file is reused
        assert g.effective_index_factory == "IVF8,Flat" and g.is_consistent() and not g.index_rebuilding
    assert "built FAISS index" not in caplog.text and "stale" not in caplog.text
    with Gallery(d, dim=DIM, model_id="m", index_factory="Flat") as g:  # explicit factories as before
        assert g.effective_index_factory == "Flat" and g.is_consistent()


def test_auto_rebuild_serves_searches_meanwhile_and_keeps_writes_made_during_it(
    tmp_path: Path, rng, monkeypatch
):
    started, release = threading.Event(), threading.Event()
    build = VectorIndex.build.__func__

    def held_build(cls, *args, **kwargs):  # the background build waits until the test lets it go
        if threading.current_thread().name == "cxr-reid-index-rebuild":
            started.set()
            assert release.wait(30)
        return build(cls, *args, **kwargs)

    monkeypatch.setattr(VectorIndex, "build", classmethod(held_build))
    x = unit(rng, 420)
    with Gallery(tmp_path / "g", dim=DIM, model_id="m", auto_flat_max=300) as g:
        recs = enrol(g, x[:400])
        assert started.wait(30) and g.index_rebuilding
        assert g.effective_index_factory == "Flat"  # still serving from the old index
        assert g.search(x[5], k=1)[0].record.image_id == recs[5].image_id
        late = enrol(g, x[400:])  # written while the new index is being built from a snapshot
        assert g.delete_image(recs[0].image_id) and g.delete_image(late[0].image_id)
        release.set()
        assert g.wait_for_rebuild(30)
        assert g.effective_index_factory == "IVF8,Flat" and len(g) == 418 and g.is_consistent()
        assert g.search(x[410], k=1)[0].record.image_id == late[10].image_id
        gone = {recs[0].image_id, late[0].image_id}
        assert not gone & {h.record.image_id for q in (x[0], x[400]) for h in g.search(q, k=5)}


# ------------------------------------------------------------------ concurrency and processes
def test_threads_search_while_one_adds(gallery: Gallery, rng):
    enrol(gallery, unit(rng, 50))
    batches = [unit(rng, 5) for _ in range(40)]
    queries = unit(rng, 20)
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher(i: int) -> None:
        try:
            n = 0
            while not stop.is_set() or n < 5:
                hits = gallery.search(queries[n % 20], k=5, collection=None if i % 2 else "default")
                assert 1 <= len(hits) <= 5
                assert all(hits[j].score >= hits[j + 1].score for j in range(len(hits) - 1))
                n += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=searcher, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for b in batches:
            enrol(gallery, b, collection="default")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors
    assert len(gallery) == 250 and gallery.is_consistent()


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def test_second_process_is_refused(gallery: Gallery):
    with pytest.raises(GalleryLockedError):  # a second open in this process is refused too
        Gallery(gallery.data_dir, dim=DIM, model_id="m1")
    proc = _python(
        """
        import sys
        from index import Gallery, GalleryError
        try:
            Gallery(sys.argv[1], dim=16, model_id="m1")
        except GalleryError as exc:
            print(type(exc).__name__, exc)
            sys.exit(0)
        sys.exit(3)
        """,
        str(gallery.data_dir),
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.startswith("GalleryLockedError") and "another process" in out
    assert len(gallery) == 0  # our handle is unaffected


def test_acknowledged_adds_survive_kill_9(tmp_path: Path):
    d = tmp_path / "g"
    proc = _python(
        """
        import sys
        import numpy as np
        from index import Gallery, NewImage
        g = Gallery(sys.argv[1], dim=16, model_id="m1")
        rng = np.random.default_rng(0)
        i = 0
        while True:  # add until killed; "ok" only after add() returned
            (r,) = g.add(rng.standard_normal((1, 16)), [NewImage(patient_id=f"p{i}", blob=b"x%d" % i)])
            print("ok", r.image_id, flush=True)
            i += 1
        """,
        str(d),
    )
    acked: list[int] = []
    try:
        for line in proc.stdout:
            if line.startswith("ok "):
                acked.append(int(line.split()[1]))
            if len(acked) == 15:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert len(acked) == 15, "child died early"
    with Gallery(d, dim=16, model_id="m1") as g:  # the kernel released the dead process's lock
        assert len(g) >= 15 and g.is_consistent()
        for i, image_id in enumerate(acked):
            r = g.get(image_id)
            assert r is not None and r.patient_id == f"p{i}"
            assert Path(r.stored_path).read_bytes() == b"x%d" % i


def test_batched_vector_reads_and_collection_ids(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with Gallery(tmp_path / "g", dim=DIM, model_id="m") as g:
        records = g.add(vectors, [NewImage(collection="a" if i % 2 else "b") for i in range(5)])
        ids = [r.image_id for r in records]
        got = g.get_vectors([ids[3], ids[0], 999])
        assert set(got) == {ids[3], ids[0]} and np.allclose(got[ids[3]], vectors[3])
        assert g.image_ids(collection="a").tolist() == [ids[1], ids[3]]
        assert g.image_ids(collection=None).tolist() == ids


def test_readiness_check_is_cheap_and_falls_back_to_the_full_one(gallery: Gallery, rng, monkeypatch):
    enrol(gallery, unit(rng, 5))
    full = []
    real = gallery.is_consistent
    monkeypatch.setattr(gallery, "is_consistent", lambda: full.append(1) or real())
    assert gallery.looks_consistent() and full == []  # counts agree: no id lists loaded
    gallery._live.current.remove(np.asarray([1], dtype=np.int64))  # FAISS drifts from SQLite (a bug)
    assert not gallery.looks_consistent() and full == [1]
