"""PHI at rest (issue 10, item 6): stored DICOM originals lose the patient's identity but decode to
the same pixels; gallery files and folders are the service user's only."""

from __future__ import annotations

import hashlib
import io
import stat
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import dicom_dataset
from pydicom.data import get_testdata_file

from app.service.phi import deidentified_dicom, stored_original
from models.imaging.preprocess import decode_image

IDENTITY = {
    "PatientName": "Doe^Jane",
    "PatientID": "MRN-0042",
    "PatientBirthDate": "19600229",
    "PatientAddress": "1 Harbour Street",
    "InstitutionName": "St Elsewhere",
    "AccessionNumber": "ACC-777",
    "ReferringPhysicianName": "House^Gregory",
}


def _identified_dicom() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 4096, (128, 128)).astype("<u2")
    ds = dicom_dataset(pixels, Modality="CR", StudyInstanceUID="1.2.3.4", ViewPosition="PA", **IDENTITY)
    ds.add_new(0x00091001, "LO", "private note about Jane")  # a private tag
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm"])
def test_real_cr_files_lose_identity_and_keep_pixels(name: str) -> None:
    original = Path(get_testdata_file(name)).read_bytes()
    before = pydicom.dcmread(io.BytesIO(original))
    assert "PatientName" in before
    stripped = deidentified_dicom(original)
    after = pydicom.dcmread(io.BytesIO(stripped))
    assert "PatientName" not in after and "PatientID" not in after and "PatientBirthDate" not in after
    assert after.PatientIdentityRemoved == "YES"
    assert after.SOPInstanceUID == before.SOPInstanceUID and after.StudyInstanceUID == before.StudyInstanceUID
    assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
    np.testing.assert_array_equal(decode_image(stripped).pixels, decode_image(original).pixels)


def test_stored_original_only_changes_dicom() -> None:
    png = b"\x89PNG\r\n\x1a\n not really"
    assert stored_original(png, "png") is png
    stripped = stored_original(_identified_dicom(), "dicom")
    for value in IDENTITY.values():
        assert value.encode() not in stripped
    assert b"private note" not in stripped


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_enrolled_dicom_is_stored_without_identity_in_private_files(make_client, tmp_path: Path) -> None:  # noqa: ANN001
    data_dir = tmp_path / "data"
    client = make_client(data_dir)
    upload = _identified_dicom()
    response = client.post("/images", files={"file": ("jane.dcm", upload)})
    assert response.status_code == 201, response.text
    image = response.json()["images"][0]["image"]
    assert (
        image["patient_id"] == "MRN-0042" and image["study_instance_uid"] == "1.2.3.4"
    )  # labels kept in the row
    assert image["sha256"] == hashlib.sha256(upload).hexdigest()  # names what the client sent
    (blob,) = [p for p in (data_dir / "images").rglob("*") if p.is_file()]
    stored = blob.read_bytes()
    for value in IDENTITY.values():
        assert value.encode() not in stored, value
    np.testing.assert_array_equal(decode_image(stored).pixels, decode_image(upload).pixels)
    client.__exit__(None, None, None)  # closing writes the FAISS file too

    assert _mode(data_dir) == 0o700 and _mode(data_dir / "images") == 0o700 and _mode(blob.parent) == 0o700
    for path in [blob, *data_dir.glob("gallery.sqlite*"), *data_dir.glob("faiss.index*"), data_dir / ".lock"]:
        assert _mode(path) == 0o600, path
