"""One rule for a patient id from every source (hardening issue, item 7): a form field, a DICOM
PatientID (``POST /images``, STOW-RS, PACS sync), a manifest, a relabel. An id that fails
``index.clean_label`` refuses that image with the reason; nothing of it is stored, so every stored
id can be named again in ``GET /images?patient_id=`` and ``DELETE /patients/{id}``."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import dicom_dataset
from fastapi.testclient import TestClient
from PIL import Image

from app.service.enrollment import bulk_enrol, items_from_source
from index import Gallery, GalleryValidationError, NewImage
from models.net.embedder import Embedder

BAD_TAG_IDS = {
    "too-long": ("x" * 10_000, "10,000 characters long"),
    "nul": ("a\x00b", "control characters"),
    "crlf": ("p1\r\nX-Injected: 1", "control characters"),
}


def dicom_bytes(png: Path, patient_id: str) -> bytes:
    """A phantom PNG as a 16-bit CR DICOM file filed under ``patient_id`` (written as given)."""
    grey = np.asarray(Image.open(png).convert("L"), dtype=np.uint16) * 257
    ds = dicom_dataset(grey, PatientID=patient_id, Modality="CR", StudyInstanceUID="1.2.3.4")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture
def client(make_client) -> TestClient:  # noqa: ANN001
    return make_client(raise_server_exceptions=False)


def test_the_rule_lives_in_the_gallery_and_the_api_uses_it() -> None:
    from app.api import dependencies
    from index import checked_patient_id, clean_label

    assert dependencies.clean_label is clean_label
    assert clean_label("  p1 ") == "p1" and clean_label("") is None
    with pytest.raises(GalleryValidationError, match="'f.dcm': its DICOM PatientID contains control"):
        checked_patient_id("a\x00b", source="'f.dcm': its DICOM PatientID")


@pytest.mark.parametrize("case", list(BAD_TAG_IDS))
def test_post_images_refuses_a_bad_dicom_patient_id(
    client: TestClient, phantom_images: list[Path], case: str
) -> None:
    value, reason = BAD_TAG_IDS[case]
    data = dicom_bytes(phantom_images[0], value)
    response = client.post("/images", files={"file": ("bad.dcm", data)})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "'bad.dcm': its DICOM PatientID" in detail and reason in detail
    assert value not in detail  # the refused value is not echoed
    assert client.get("/images").json()["total"] == 0
    # a patient_id field files it under a good id instead
    ok = client.post("/images", files={"file": ("bad.dcm", data)}, data={"patient_id": "p1"})
    assert ok.status_code == 201, ok.text
    assert client.delete("/patients/p1").json()["deleted"] == 1


def test_stow_refuses_the_instance_with_a_bad_patient_id_and_stores_the_rest(
    client: TestClient, phantom_images: list[Path]
) -> None:
    parts = [dicom_bytes(phantom_images[0], "good-1")] + [
        dicom_bytes(phantom_images[0], value) for value, _ in BAD_TAG_IDS.values()
    ]
    boundary = uuid.uuid4().hex
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
            for part in parts
        )
        + f"--{boundary}--\r\n".encode()
    )
    response = client.post(
        "/dicomweb/studies",
        content=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        },
    )
    assert response.status_code == 202, response.text
    answer = response.json()
    assert len(answer["00081199"]["Value"]) == 1  # the good one
    assert len(answer["00081198"]["Value"]) == len(BAD_TAG_IDS)  # one failure per bad PatientID
    text = json.dumps(answer)
    assert text.count("its DICOM PatientID") == len(BAD_TAG_IDS)
    page = client.get("/images").json()
    assert page["total"] == 1 and page["items"][0]["patient_id"] == "good-1"


def test_the_gallery_refuses_bad_patient_ids_on_add_and_relabel(tmp_path: Path) -> None:
    gallery = Gallery(tmp_path / "g", model_id="m", dim=4)
    try:
        vector = np.eye(4, dtype=np.float32)[:1]
        for value, reason in BAD_TAG_IDS.values():
            with pytest.raises(GalleryValidationError, match=reason):
                gallery.add(vector, [NewImage(patient_id=value, source_path="/x.png")])
        assert len(gallery) == 0
        [record] = gallery.add(vector, [NewImage(patient_id=" p1 ", source_path="/x.png")])
        assert record.patient_id == "p1"
        with pytest.raises(GalleryValidationError, match="control characters"):
            gallery.set_patient_id(record.image_id, "p\n2")
        assert gallery.get(record.image_id).patient_id == "p1"
    finally:
        gallery.close()


def test_bulk_enrol_refuses_bad_manifest_and_tag_ids_file_by_file(
    tmp_path: Path, embedder: Embedder, phantom_images: list[Path]
) -> None:
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "nul.dcm").write_bytes(dicom_bytes(phantom_images[0], "a\x00b"))
    (folder / "good.dcm").write_bytes(dicom_bytes(phantom_images[0], "good-1"))
    manifest = folder / "manifest.csv"
    manifest.write_text(f"path,patient_id\n{phantom_images[2]},{'y' * 300}\n{phantom_images[3]},p2\n")
    gallery = Gallery(tmp_path / "g", model_id=embedder.model_id, dim=embedder.dim)
    try:
        from_manifest = bulk_enrol(embedder, gallery, items_from_source(manifest), progress=False)
        assert from_manifest.enrolled == 1 and len(from_manifest.failed) == 1
        assert "patient_id is 300 characters long" in from_manifest.failed[0][1]
        dicoms = [item for item in items_from_source(folder) if item.path.suffix == ".dcm"]
        from_tags = bulk_enrol(embedder, gallery, dicoms, progress=False)
        assert from_tags.enrolled == 1 and len(from_tags.failed) == 1
        assert from_tags.failed[0][0].endswith("nul.dcm")
        assert "its DICOM PatientID contains control characters" in from_tags.failed[0][1]
        assert sorted(r.patient_id for r in gallery.list_images(offset=0, limit=10)[0]) == ["good-1", "p2"]
    finally:
        gallery.close()
