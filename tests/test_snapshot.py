"""index.GallerySnapshot: a read-only view of a data dir (no lock, no FAISS, nothing written), and
``cxr-reid risk`` reading a gallery through it."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from index import Gallery, GalleryError, GallerySnapshot, NewImage, is_gallery_dir
from index.store import DB_NAME

DIM = 8


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _tree(data_dir: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(data_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in data_dir.rglob("*")
    }


def test_snapshot_reads_what_the_open_gallery_holds_and_writes_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "g"
    x = _unit(rng, 4)
    with Gallery(data, dim=DIM, model_id="m1") as gallery:  # the lock is held throughout
        records = gallery.add(
            x,
            [
                NewImage(patient_id="a", blob=b"first"),
                NewImage(patient_id="a", collection="other", source_path="/x/b.png"),
                NewImage(patient_id=None, source_path="/x/c.png"),
                NewImage(patient_id="d", blob=b"fourth", source_path="/x/d.dcm"),
            ],
        )
        gallery.delete_image(records[2].image_id)
        before = _tree(data)
        snap = GallerySnapshot.read(data)
        assert _tree(data) == before  # no lock file, no WAL, no FAISS file touched
        kept = [r for r in records if r.image_id != records[2].image_id]
        assert len(snap) == 3 and snap.image_ids.tolist() == [r.image_id for r in kept]
        assert snap.model_id == "m1" and snap.dim == DIM and snap.generation == gallery.generation
        assert snap.patient_ids == ["a", "a", "d"] and snap.collections == ["default", "other", "default"]
        assert snap.source_paths == [None, "/x/b.png", "/x/d.dcm"] and snap.row_model_ids == ["m1"] * 3
        assert snap.vectors.dtype == np.float32 and np.allclose(snap.vectors, x[[0, 1, 3]], atol=1e-6)
        stored = snap.stored_paths
        assert (
            stored[1] is None and stored[0].read_bytes() == b"first" and stored[2].read_bytes() == b"fourth"
        )
        assert [str(p.resolve()) if p else None for p in stored] == [r.stored_path for r in kept]
        assert len(gallery) == 3  # the gallery goes on as before


def test_snapshot_of_an_empty_gallery_and_its_refusals(tmp_path: Path) -> None:
    with Gallery(tmp_path / "g", dim=DIM, model_id="m1"):
        pass
    snap = GallerySnapshot.read(tmp_path / "g")
    assert len(snap) == 0 and snap.vectors.shape == (0, DIM) and snap.model_id == "m1"
    assert is_gallery_dir(tmp_path / "g") and not is_gallery_dir(tmp_path)
    with pytest.raises(GalleryError, match="cannot read the gallery database .*unable to open"):
        GallerySnapshot.read(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / DB_NAME).write_bytes(b"not a database at all" * 100)
    with pytest.raises(GalleryError, match="cannot read the gallery database .*not a database"):
        GallerySnapshot.read(tmp_path / "bad")


def test_risk_reads_a_gallery_through_the_snapshot_with_its_messages(tmp_path: Path) -> None:
    from app.analysis.risk import RiskError, is_gallery, read_gallery
    from models.scoring.decide import image_key

    rng = np.random.default_rng(1)
    embedder = types.SimpleNamespace(model_id="m1", dim=DIM)
    with Gallery(tmp_path / "g", dim=DIM, model_id="m1") as gallery:
        x = _unit(rng, 2)
        gallery.add(
            x, [NewImage(patient_id="p", blob=b"one"), NewImage(patient_id="q", source_path="/a/b.png")]
        )
        found = read_gallery(tmp_path / "g", embedder)  # while the gallery is open
    assert is_gallery(tmp_path / "g") and found.kind == "gallery" and found.patient_ids == ["p", "q"]
    assert np.allclose(found.vectors, x, atol=1e-6)
    assert [i.key for i in found.images] == ["default:p", "default:q"]
    assert found.keys == [image_key("p", "default"), image_key("q", "default")]
    sha = found.images[0].path.name
    assert found.images[0].path == tmp_path / "g" / "images" / sha[:2] / sha  # the data dir as given
    assert found.images[0].path.read_bytes() == b"one" and found.images[1].path == Path("/a/b.png")
    assert [i.shown for i in found.images] == ["default/1", "default/2 (b.png)"]
    with pytest.raises(RiskError, match="stores 8-d vectors, the model makes 4"):
        read_gallery(tmp_path / "g", types.SimpleNamespace(model_id="m1", dim=4))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / DB_NAME).write_bytes(b"garbage" * 200)
    db = (tmp_path / "bad" / DB_NAME).resolve()
    with pytest.raises(RiskError, match=f"^cannot read the gallery database {db}: file is not a database$"):
        read_gallery(tmp_path / "bad", embedder)
