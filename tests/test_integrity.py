"""Integrity at start (issue 10, item 3): a data dir whose database is missing, empty or damaged is
never served as an empty gallery; `cxr-reid check` says so offline; orphans are removed on open."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.server_process import ROOT
from index import Gallery, GalleryIntegrityError, NewImage
from models.net.embedder import Embedder

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


# ------------------------------------------------------------- lost originals (hardening issue, item 9)
def test_the_gallery_counts_missing_originals_at_open_and_while_open(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    _filled(data_dir)
    images = data_dir / "images"
    shutil.rmtree(images)
    with Gallery(data_dir, dim=DIM, model_id="m1") as gallery:  # at open
        assert gallery.missing_originals() == 40
        report = gallery.check_originals()
        assert not report.ok and len(report.stored_problems["missing"]) == 40 and report.stored == 40
        assert "40 image(s) whose stored original is missing (e.g. image 1)" in report.summary()
        assert gallery.delete_image(1) and gallery.missing_originals() == 39  # deleted: not missing
        # the same bytes sent again are stored again
        rng = np.random.default_rng(1)
        vector = rng.standard_normal((1, DIM)).astype(np.float32)
        gallery.add(vector, [NewImage(patient_id="p2", blob=b"original 2")])
        assert gallery.missing_originals() == 38

    _filled(tmp_path / "fresh")
    with Gallery(tmp_path / "fresh", dim=DIM, model_id="m1") as gallery:  # while open
        assert gallery.missing_originals() == 0 and gallery.check_originals(deep=True).ok
        one = next((tmp_path / "fresh" / "images").glob("*/*"))
        one.unlink()
        # found by the readiness probe's random sample within a few calls (8 of 40 per call)
        assert any(gallery.missing_originals() == 1 for _ in range(300))
        shutil.rmtree(tmp_path / "fresh" / "images")
        assert gallery.missing_originals() == 40  # the whole folder: at once


def test_check_originals_sizes_and_hashes(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    _filled(data_dir, n=3)
    source = tmp_path / "external.png"
    source.write_bytes(b"an external original")
    with Gallery(data_dir, dim=DIM, model_id="m1") as gallery:
        vector = np.eye(DIM, dtype=np.float32)[:1]
        sha = hashlib.sha256(source.read_bytes()).hexdigest()
        gallery.add(vector, [NewImage(patient_id="q", source_path=str(source), sha256=sha)])
        files = sorted((data_dir / "images").glob("*/*"))
        files[0].write_bytes(b"")  # truncated to nothing: seen without reading
        files[1].write_bytes(b"same size!")  # changed bytes: seen only by --deep
        source.write_bytes(b"an external ORIGINAL")
        shallow = gallery.check_originals()
        assert [len(v) for v in shallow.stored_problems.values()] == [0, 1, 0]
        assert shallow.referenced == 1 and not any(shallow.referenced_problems.values())
        deep = gallery.check_originals(deep=True)
        assert [len(v) for v in deep.stored_problems.values()] == [0, 1, 1]
        assert len(deep.referenced_problems["corrupt"]) == 1
        assert deep.as_dict()["stored"] == {
            "originals": 3,
            "missing": 0,
            "empty": 1,
            "empty_image_ids": deep.stored_problems["empty"],
            "corrupt": 1,
            "corrupt_image_ids": deep.stored_problems["corrupt"],
        }
        source.unlink()
        assert gallery.check_originals().referenced_problems["missing"] == [4]


def test_the_service_is_not_ready_when_originals_are_lost(
    make_client, tmp_path: Path, phantom_images
) -> None:
    data_dir = tmp_path / "served"
    client = make_client(data_dir)
    for i, path in enumerate(phantom_images[:3]):
        client.post("/images", files={"file": (path.name, path.read_bytes())}, data={"patient_id": f"p{i}"})
    assert client.get("/readyz").status_code == 200
    shutil.rmtree(data_dir / "images")  # while it serves
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "3 stored original(s) are missing" in ready.json()["detail"]
    client.__exit__(None, None, None)
    restarted = make_client(data_dir)  # and after a restart
    assert restarted.get("/readyz").status_code == 503


def test_check_command_fails_on_lost_originals(
    tmp_path: Path, tiny_checkpoint: Path, embedder, phantom_images, capsys
) -> None:
    from app.cli import main

    data_dir = tmp_path / "data"
    with Gallery(data_dir, dim=embedder.dim, model_id=embedder.model_id) as gallery:
        vectors = embedder.embed([str(p) for p in phantom_images[:3]])
        gallery.add(vectors, [NewImage(patient_id="p1", blob=p.read_bytes()) for p in phantom_images[:3]])
    argv = ["check", "--data-dir", str(data_dir), "--model", str(tiny_checkpoint)]
    assert main(argv) == 0
    capsys.readouterr()
    shutil.rmtree(data_dir / "images")
    assert main(argv) == 1
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["index_matches_database"] is True
    assert report["originals"]["ok"] is False and report["originals"]["stored"]["missing"] == 3
    assert "3 image(s) whose stored original is missing" in err and "reindex" in err
    assert main([*argv, "--deep"]) == 1
    assert json.loads(capsys.readouterr().out)["originals"]["hashes_checked"] is True


@pytest.fixture
def read_only_data_dir(tmp_path: Path, embedder: Embedder) -> Iterator[Path]:
    """A gallery data dir, then mounted read-only (a volume mounted the wrong way); needs root."""
    data_dir = tmp_path / "data"
    with Gallery(data_dir, dim=embedder.dim, model_id=embedder.model_id):
        pass
    bind = ["mount", "--bind", str(data_dir), str(data_dir)]
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(bind).returncode:
        pytest.skip("needs root and mount to make a read-only volume")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(data_dir)], check=True)
        yield data_dir
    finally:
        subprocess.run(["umount", "-l", str(data_dir)], check=False)


def test_a_read_only_data_dir_leaves_the_service_unready_with_the_reason(
    read_only_data_dir: Path, make_client: Callable[..., TestClient]
) -> None:
    """Not a traceback and a dead process: the service starts, /healthz answers, /readyz says 503
    and what to do."""
    client = make_client(read_only_data_dir)
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert "Read-only file system" in ready.json()["detail"] and "read-write" in ready.json()["detail"]
