"""The gallery commands: enroll (manifest, folder, resume, --copy), reindex after a model change."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dicom_dataset, save_random_checkpoint
from fastapi.testclient import TestClient

from app.cli import main
from app.main import create_app
from app.settings import Settings
from index import Gallery
from models.net.embedder import Embedder


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny model (other weights, so another model id) for reindex tests."""
    return save_random_checkpoint(
        tmp_path_factory.mktemp("other") / "other.pt",
        name="tiny-other",
        seed=1,
        embedding_dim=64,
        genuine=(0.8, 0.05, 300),
        impostor=(0.3, 0.1, 5000),
    )


def records(data_dir: Path, checkpoint: Path) -> list:
    embedder = Embedder.from_checkpoint(checkpoint)
    with Gallery(data_dir, dim=embedder.dim, model_id=embedder.model_id) as gallery:
        return gallery.list_images(collection=None, limit=1000)[0]


def cli(*args: object) -> int:
    return main([str(a) for a in args])


def dicom_file(path: Path, pixels: np.ndarray, patient_id: str) -> Path:
    from pydicom.uid import generate_uid

    ds = dicom_dataset(
        pixels,
        StudyInstanceUID=generate_uid(),
        Modality="DX",
        PatientID=patient_id,
        PatientName="Doe^John",
        ViewPosition="AP",
    )
    ds.save_as(path, enforce_file_format=True)
    return path


# ------------------------------------------------------------------------------------------ enroll
def test_enroll_manifest_is_resumable(tiny_checkpoint: Path, phantom_set: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    rows = list(csv.DictReader(phantom_set.open()))
    partial = tmp_path / "partial.csv"  # an interrupted run: the first 7 rows made it
    with partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**row, "path": str(phantom_set.parent / row["path"])} for row in rows[:7])
    assert cli("enroll", partial, "--data-dir", data, "--model", tiny_checkpoint, "--no-progress") == 0
    assert len(records(data, tiny_checkpoint)) == 7

    args = ("--data-dir", data, "--model", tiny_checkpoint, "--no-progress", "--batch-size", 4)
    assert cli("enroll", phantom_set, *args) == 0
    stored = records(data, tiny_checkpoint)
    assert len(stored) == len(rows) == 18
    first = stored[0]
    assert first.patient_id == rows[0]["patient_id"]  # as written in the manifest, not namespaced
    assert first.split == rows[0]["split"] and first.view == "PA"
    assert first.tags["offset_days"] == rows[0]["offset_days"]
    assert first.source_path == str((phantom_set.parent / rows[0]["path"]).resolve())
    assert first.stored_path is None
    assert cli("enroll", phantom_set, *args) == 0  # nothing new
    assert len(records(data, tiny_checkpoint)) == 18


def test_enroll_folder_with_copy_and_bad_files(
    tiny_checkpoint: Path, phantom_images: list[Path], tmp_path: Path
) -> None:
    from PIL import Image

    folder = tmp_path / "incoming"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(phantom_images[0], folder / "a.png")
    dicom_file(folder / "sub" / "IM0001", np.asarray(Image.open(phantom_images[3]), dtype=np.uint16), "D-42")
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    data = tmp_path / "data"
    code = cli(
        "enroll", folder, "--data-dir", data, "--model", tiny_checkpoint, "--copy", "--collection", "in"
    )
    assert code == 1  # one image file could not be decoded; the others went in
    stored = {Path(r.stored_path).name: r for r in records(data, tiny_checkpoint)}
    assert len(stored) == 2
    by_patient = {r.patient_id: r for r in stored.values()}
    assert set(by_patient) == {None, "D-42"}
    assert by_patient["D-42"].view == "AP" and by_patient["D-42"].collection == "in"
    assert all(r.source_path is None and Path(r.stored_path).is_file() for r in stored.values())


def test_enroll_missing_source_is_an_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    assert cli("enroll", tmp_path / "nope.csv", "--data-dir", tmp_path / "d", "--model", tiny_checkpoint) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer where there is no GPU")
def test_enroll_on_a_gpu_that_is_not_there_says_so(
    tiny_checkpoint: Path, phantom_images: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    folder = phantom_images[0].parent
    assert cli("enroll", folder, "--data-dir", data, "--model", tiny_checkpoint, "--device", "cuda") == 2
    assert "torch sees no GPU" in caplog.text
    assert not (data / "gallery.sqlite").exists()  # nothing half-made


# ------------------------------------------------------------------------------------------ reindex
def test_model_change_needs_reindex(
    tiny_checkpoint: Path, other_checkpoint: Path, phantom_images: list[Path], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    with TestClient(create_app(Settings(data_dir=data, model_path=tiny_checkpoint))) as client:
        for path in phantom_images[:3]:
            assert client.post("/images", files={"file": (path.name, path.read_bytes())}).status_code == 201
    assert cli("enroll", phantom_images[3].parent, "--data-dir", data, "--model", tiny_checkpoint) == 0
    new_model = Embedder.from_checkpoint(other_checkpoint)

    with TestClient(create_app(Settings(data_dir=data, model_path=other_checkpoint))) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "reindex" in ready.json()["detail"]
        assert client.get("/images").status_code == 503
        assert client.post("/search", data={"image_id": 1}).status_code == 503
        assert client.get("/healthz").status_code == 200
        embedded = client.post("/embed", files={"file": ("a.png", phantom_images[0].read_bytes())})
        assert embedded.status_code == 200 and embedded.json()["model_id"] == new_model.model_id

    assert cli("reindex", "--data-dir", data, "--model", other_checkpoint, "--no-progress") == 0
    with TestClient(create_app(Settings(data_dir=data, model_path=other_checkpoint))) as client:
        assert client.get("/readyz").status_code == 200
        listing = client.get("/images").json()
        assert listing["total"] == 6 and {i["model_id"] for i in listing["items"]} == {new_model.model_id}
        hit = client.post("/search", files={"file": ("q.png", phantom_images[4].read_bytes())}).json()[
            "matches"
        ][0]
        assert hit["score"] == pytest.approx(1.0, abs=1e-5)


def test_reindex_stops_on_a_missing_original(
    tiny_checkpoint: Path, other_checkpoint: Path, phantom_images: list[Path], tmp_path: Path
) -> None:
    folder = tmp_path / "refs"
    folder.mkdir()
    for path in phantom_images[:2]:
        shutil.copy(path, folder / path.name.replace(".png", f"-{path.parent.name}.png"))
    data = tmp_path / "data"
    assert cli("enroll", folder, "--data-dir", data, "--model", tiny_checkpoint, "--no-progress") == 0
    next(folder.iterdir()).unlink()
    assert cli("reindex", "--data-dir", data, "--model", other_checkpoint, "--no-progress") == 1


def test_commands_refuse_a_gallery_open_elsewhere(
    tiny_checkpoint: Path, phantom_set: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    with TestClient(create_app(Settings(data_dir=data, model_path=tiny_checkpoint))):
        assert cli("enroll", phantom_set, "--data-dir", data, "--model", tiny_checkpoint) == 2


def test_serve_refuses_bad_options_before_starting(tiny_checkpoint: Path, tmp_path: Path) -> None:
    assert cli("serve", "--workers", 2, "--data-dir", tmp_path, "--model", tiny_checkpoint) == 2
    assert cli("serve", "--data-dir", tmp_path, "--model", tmp_path / "missing.pt") == 2
