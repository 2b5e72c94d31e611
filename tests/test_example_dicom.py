"""The example children as DICOM (examples/dicom/, written by examples/make_dicom.py): the committed
files are what the script makes, carry the tags a PACS reads, hold the JPEG's pixels unchanged, and
the shipped model files the seven without an alert and flags the misfile as child A."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.server_process import ROOT
from app.settings import Settings
from models.net.embedder import Embedder

DICOM = ROOT / "examples" / "dicom"
RADIOGRAPHS = ROOT / "examples" / "radiographs"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def manifest() -> list[dict[str, str]]:
    with (DICOM / "manifest.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _make_dicom(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "examples/make_dicom.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_committed_files_are_what_the_script_writes(tmp_path: Path) -> None:
    done = _make_dicom("--check")
    assert done.returncode == 0, done.stderr
    assert _make_dicom("--out", str(tmp_path)).returncode == 0
    assert _make_dicom("--out", str(tmp_path), "--check").returncode == 0  # byte for byte the same again
    (tmp_path / "child-a-1.dcm").write_bytes(b"changed")
    stale = _make_dicom("--out", str(tmp_path), "--check")
    assert stale.returncode == 1 and "child-a-1.dcm" in stale.stderr


def test_every_example_carries_a_pacs_tags_and_the_jpegs_pixels() -> None:
    rows = manifest()
    assert len(rows) == 8 and sum(r["path"].startswith("misfiled/") for r in rows) == 1
    instances = set()
    for row in rows:
        path = DICOM / row["path"]
        assert path.stat().st_size < 64 * 1024, path
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == CR_IMAGE_STORAGE
        assert ds.Modality == "CR" and ds.BodyPartExamined == "CHEST" and ds.ViewPosition in ("AP", "PA")
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.PatientID == row["patient_id"] and ds.StudyDate
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == (
            row["study_uid"],
            row["series_uid"],
            row["sop_instance_uid"],
        )
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            assert uid.is_valid, uid
        instances.add(ds.SOPInstanceUID)
        grey = np.asarray(Image.open(RADIOGRAPHS / row["source"]).convert("L"))
        assert np.array_equal(ds.pixel_array, grey)
    assert len(instances) == len(rows)


def _stow(client: TestClient, paths: list[Path]) -> tuple[int, dict]:
    boundary = "example-boundary"
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p.read_bytes() + b"\r\n"
            for p in paths
        )
        + f"--{boundary}--\r\n".encode()
    )
    answer = client.post(
        "/dicomweb/studies",
        content=body,
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
    )
    return answer.status_code, answer.json()


@pytest.mark.slow
def test_the_shipped_model_files_the_children_cleanly_and_flags_the_misfile(tmp_path: Path) -> None:
    embedder = Embedder.from_checkpoint(None, runtime="torch")
    with TestClient(create_app(Settings(data_dir=tmp_path / "data"), embedder=embedder)) as client:
        status, answer = _stow(client, sorted(DICOM.glob("*.dcm")))
        assert status == 200, answer
        stored = answer["00081199"]["Value"]
        assert len(stored) == 7 and not any("0040A160" in item for item in stored), stored
        status, answer = _stow(client, sorted((DICOM / "misfiled").glob("*.dcm")))
        assert status == 200, answer
        (item,) = answer["00081199"]["Value"]
        assert "matches_other_patient" in item["0040A160"]["Value"][0]
        assert "child-A" in item["0040A160"]["Value"][0]
        images = client.get("/images", params={"patient_id": "child-B"}).json()
        assert images["total"] == 3
