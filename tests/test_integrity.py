"""Integrity at start (issue 10, item 3): a data dir whose database is missing, empty or damaged is
never served as an empty gallery; `cxr-reid check` says so offline; orphans are removed on open."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.server_process import ROOT
from index import Gallery, GalleryIntegrityError, NewImage

DIM = 16


def _filled(data_dir: Path, n: int = 40) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with Gallery(data_dir, dim=DIM, model_id="m1") as gallery:
        gallery.add(vectors, [NewImage(patient_id=f"p{i}", blob=f"original {i}".encode()) for i in range(n)])


def _damage(path: Path, size: int = 64 * 1024) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + size] = os.urandom(min(size, len(data) - middle))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["missing", "empty"])
def test_no_empty_gallery_over_stored_data_without_init(tmp_path: Path, how: str) -> None:
    data_dir = tmp_path / "data"
    _filled(data_dir)
    database = data_dir / "gallery.sqlite"
    database.unlink()
    if how == "empty":
        database.write_bytes(b"")
    with pytest.raises(
        GalleryIntegrityError, match=f"40 stored original.*gallery.sqlite {'is ' + how}.*--init"
    ):
        Gallery(data_dir, dim=DIM, model_id="m1")
    assert len(list((data_dir / "images").glob("*/*"))) == 40  # nothing touched
    with Gallery(data_dir, dim=DIM, model_id="m1", init=True) as gallery:  # the explicit way out
        assert len(gallery) == 0
    assert not list((data_dir / "images").glob("*/*"))  # the orphaned originals are cleaned up


def test_a_damaged_database_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    _filled(data_dir, n=400)
    _damage(data_dir / "gallery.sqlite")
    with pytest.raises(GalleryIntegrityError, match="is damaged.*restore it from a backup"):
        Gallery(data_dir, dim=DIM, model_id="m1")


def test_the_service_is_not_ready_on_a_damaged_gallery(make_client, tmp_path: Path, phantom_images) -> None:  # noqa: ANN001
    data_dir = tmp_path / "served"
    client = make_client(data_dir)
    for i, path in enumerate(phantom_images[:4]):
        client.post("/images", files={"file": (path.name, path.read_bytes())}, data={"patient_id": f"p{i}"})
    client.__exit__(None, None, None)
    (data_dir / "gallery.sqlite").unlink()
    client = make_client(data_dir)
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "is missing: is the right volume mounted?" in ready.json()["detail"]
    assert client.get("/images").status_code == 503
    assert (
        client.post("/images", files={"file": ("a.png", phantom_images[0].read_bytes())}).status_code == 503
    )


def _check(data_dir: Path, model: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "app.cli", "check", "--data-dir", str(data_dir), "--model", str(model)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.server
@pytest.mark.slow
def test_check_command(tmp_path: Path, tiny_checkpoint: Path, embedder, phantom_images) -> None:  # noqa: ANN001
    data_dir = tmp_path / "data"
    with Gallery(data_dir, dim=embedder.dim, model_id=embedder.model_id) as gallery:
        vectors = embedder.embed([str(p) for p in phantom_images[:3]])
        gallery.add(vectors, [NewImage(patient_id="p1", blob=p.read_bytes()) for p in phantom_images[:3]])
    orphan = data_dir / "images" / "ab" / ("ab" + "0" * 62)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"left by a crash")
    good = _check(data_dir, tiny_checkpoint)
    assert good.returncode == 0, good.stderr
    report = json.loads(good.stdout)
    assert report["images"] == 3 and report["index_matches_database"] is True
    assert report["index"] == "Flat" and report["index_rebuilding"] is False
    assert not orphan.exists()
    _damage(data_dir / "gallery.sqlite", size=4096)
    bad = _check(data_dir, tiny_checkpoint)
    assert bad.returncode == 1 and "check failed:" in bad.stderr and "damaged" in bad.stderr
