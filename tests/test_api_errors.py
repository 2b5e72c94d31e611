"""Bad input, unknown ids, limits and API keys: always a 4xx with a JSON detail, never a 500."""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import dicom_dataset
from fastapi.testclient import TestClient


@pytest.fixture
def make_client(make_client: Callable[..., TestClient]) -> Callable[..., TestClient]:
    """The conftest factory, but a server error comes back as a 500 response instead of raising."""
    return functools.partial(make_client, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def png(phantom_images: list[Path]) -> bytes:
    return phantom_images[0].read_bytes()


def dicom(modality: str = "CR", *, pixels: bool = True, transfer_syntax: str | None = None) -> bytes:
    image = np.arange(32 * 32, dtype="<u2").reshape(32, 32) if pixels else None
    ds = dicom_dataset(image, transfer_syntax=transfer_syntax, Modality=modality, PatientID="P")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def assert_error(response, status: int, *words: str) -> None:  # noqa: ANN001
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    text = detail if isinstance(detail, str) else str(detail)
    for word in words:
        assert word.lower() in text.lower(), f"{word!r} not in {text!r}"


# ------------------------------------------------------------------------------------------ bad images
@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", ("empty",)),
        (b"hello, this is plainly text\n", ("text",)),
        (b"\x00\x01\x02\x03" * 64, ("not a recognised image",)),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, ("png",)),
    ],
    ids=["empty", "text", "binary", "corrupt-png"],
)
@pytest.mark.parametrize("route", ["/embed", "/images", "/search"])
def test_unusable_uploads_are_422(
    client: TestClient, route: str, data: bytes, words: tuple[str, ...]
) -> None:
    response = client.post(route, files={"file": ("upload.bin", data)})
    assert_error(response, 422, "upload.bin", *words)


def test_truncated_png_and_dicoms(client: TestClient, png: bytes) -> None:
    assert_error(client.post("/embed", files={"file": ("t.png", png[: len(png) // 2])}), 422, "t.png")
    assert_error(client.post("/embed", files={"file": ("ct.dcm", dicom("CT"))}), 422, "modality", "CT")
    assert_error(client.post("/embed", files={"file": ("sr.dcm", dicom(pixels=False))}), 422, "pixel data")
    cut = dicom()
    assert_error(client.post("/embed", files={"file": ("cut.dcm", cut[: len(cut) - 1000])}), 422, "cut.dcm")
    unsupported = dicom(transfer_syntax="1.2.840.10008.1.2.4.100")  # MPEG2: not an image codec we have
    assert_error(client.post("/embed", files={"file": ("mpeg.dcm", unsupported)}), 422, "transfer syntax")


def test_verify_with_a_bad_image_is_422(client: TestClient, png: bytes) -> None:
    response = client.post("/verify", files={"file_a": ("a.png", png), "file_b": ("b.txt", b"not an image")})
    assert_error(response, 422, "b.txt")


# ------------------------------------------------------------------------------------------ limits
def test_upload_over_the_size_limit_is_413(make_client: Callable[..., TestClient], png: bytes) -> None:
    client = make_client(max_upload_bytes=len(png) - 1)
    assert_error(client.post("/embed", files={"file": ("a.png", png)}), 413, "limit")
    big = b"\x89PNG\r\n\x1a\n" + b"\x00" * (len(png) + 100_000)  # over the limit + multipart slack
    assert_error(client.post("/images", files={"file": ("a.png", big)}), 413, "limit")
    assert client.get("/images").json()["total"] == 0
    ok = make_client(max_upload_bytes=len(png) + 10)
    assert ok.post("/embed", files={"file": ("a.png", png)}).status_code == 200


def test_declared_content_length_over_the_limit_is_refused_before_reading(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_upload_bytes=1000)
    response = client.post(
        "/embed",
        content=b"x" * 10,
        headers={"content-length": "5000000", "content-type": "multipart/form-data"},
    )
    assert_error(response, 413, "upload limit")


def test_pixel_limit_is_422(make_client: Callable[..., TestClient], png: bytes) -> None:
    client = make_client(max_pixels=100 * 100)
    assert_error(client.post("/embed", files={"file": ("a.png", png)}), 422, "a.png", "limit")


def test_too_many_files_is_422(make_client: Callable[..., TestClient], png: bytes) -> None:
    client = make_client(max_files=2)
    files = [("files", (f"{i}.png", png)) for i in range(3)]
    assert_error(client.post("/embed", files=files), 422, "at most 2")


# ------------------------------------------------------------------------------------------ fields
def test_missing_and_contradictory_fields(client: TestClient, png: bytes) -> None:
    f = ("a.png", png)
    assert_error(client.post("/embed"), 422, "file")
    assert_error(client.post("/images", data={"patient_id": "x"}), 422, "file")
    assert_error(client.post("/verify"), 422, "file_a")
    assert_error(client.post("/verify", files={"file_a": f}), 422, "file_b", "image_id_b")
    assert_error(
        client.post("/verify", files={"file_a": f, "file_b": f}, data={"image_id_a": 1}), 422, "not both"
    )
    assert_error(
        client.post("/verify", files={"file_a": f, "file_b": f}, data={"patient_id": "p"}),
        422,
        "file_a",
        "file_b",
    )
    assert_error(client.post("/verify", files={"file": f}), 422, "patient_id")
    assert_error(client.post("/verify", data={"patient_id": "p"}), 422, "file", "image_id")
    assert_error(
        client.post("/verify", files={"file": f}, data={"patient_id": "p", "image_id": 1}), 422, "not both"
    )
    assert_error(client.post("/search"), 422, "file", "image_id")
    assert_error(client.post("/search", files={"file": f}, data={"image_id": 1}), 422, "not both")
    assert_error(client.post("/search", files={"file": f}, data={"k": 0}), 422)
    assert_error(client.post("/verify", data={"image_id_a": "one", "image_id_b": 2}), 422, "image_id_a")


def test_bad_operating_points(client: TestClient, png: bytes) -> None:
    files = {"file_a": ("a.png", png), "file_b": ("b.png", png)}
    assert_error(client.post("/verify", files=files, data={"far": "1e-3", "threshold": 0.5}), 422, "not both")
    assert_error(client.post("/verify", files=files, data={"far": "abc"}), 422, "far")
    assert_error(client.post("/verify", files=files, data={"far": "0.9"}), 422, "far")
    assert_error(client.post("/verify", files=files, data={"threshold": 2}), 422, "threshold")
    assert_error(client.get("/duplicates", params={"far": "1e-9"}), 422, "far")


def test_bad_enrol_metadata(client: TestClient, png: bytes) -> None:
    f = {"file": ("a.png", png)}
    assert_error(client.post("/images", files=f, data={"tags": "{nope"}), 422, "tags")
    assert_error(client.post("/images", files=f, data={"tags": "[1, 2]"}), 422, "tags", "object")
    assert_error(client.post("/images", files=f, data={"tags": '{"a": {"b": 1}}'}), 422, "tag 'a'")
    assert_error(client.post("/images", files=f, data={"collection": "*"}), 422, "collection")
    assert client.get("/images").json()["total"] == 0


def test_failed_enrolment_writes_nothing(client: TestClient, png: bytes, tmp_path: Path) -> None:
    files = [("files", ("a.png", png)), ("files", ("bad.png", b"\x89PNG\r\n\x1a\nbroken"))]
    assert_error(client.post("/images", files=files), 422, "bad.png")
    assert client.get("/images").json()["total"] == 0
    blobs = [p for p in (tmp_path / "data" / "images").rglob("*") if p.is_file()]
    assert blobs == []


# ------------------------------------------------------------------------------------------ unknown ids
def test_unknown_ids_are_404(client: TestClient, png: bytes) -> None:
    assert_error(client.get("/images/999"), 404, "999")
    assert_error(client.delete("/images/999"), 404, "999")
    assert_error(client.delete("/patients/nobody"), 404)
    assert_error(
        client.post("/verify", files={"file_a": ("a.png", png)}, data={"image_id_b": 999}), 404, "999"
    )
    assert_error(client.post("/search", data={"image_id": 999}), 404, "999")
    assert_error(client.post("/verify", data={"image_id": 999, "patient_id": "p"}), 404, "999")
    assert client.get("/nowhere").status_code == 404
    # ids beyond SQLite's integer range are a client error, not a crash
    assert_error(client.get(f"/images/{2**70}"), 422)
    assert_error(client.post("/search", data={"image_id": str(2**70)}), 422)
    assert_error(client.post("/verify", data={"image_id_a": str(2**70), "image_id_b": 1}), 422)


# ------------------------------------------------------------------------------------------ API keys
def test_api_keys(
    make_client: Callable[..., TestClient], png: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(api_keys="alpha-key, beta-key")
    f = {"file": ("a.png", png)}
    assert_error(client.post("/embed", files=f), 401, "missing")
    with caplog.at_level(logging.WARNING):
        assert_error(client.post("/embed", files=f, headers={"X-API-Key": "wrong-key-123"}), 401, "invalid")
        client.delete("/patients/P-77", headers={"X-API-Key": "wrong-key-123"})
    server_side = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("httpx"))
    assert "wrong-key-123" not in server_side and "P-77" not in server_side
    assert "sha256:" in server_side and "POST /embed" in server_side
    for key in ("alpha-key", "beta-key"):
        assert client.post("/embed", files=f, headers={"X-API-Key": key}).status_code == 200
    for path in ("/images", "/images/1", "/duplicates", "/metrics"):
        assert client.get(path).status_code == 401
    assert client.post("/search", data={"image_id": 1}).status_code == 401
    assert client.delete("/patients/x").status_code == 401
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json() == {"status": "ready"}  # the status for all, details for keys
    assert client.get("/readyz", headers={"X-API-Key": "alpha-key"}).json()["gallery_images"] == 0
    assert client.get("/metrics", headers={"X-API-Key": "alpha-key"}).status_code == 200


def test_logs_hold_no_names_or_pixels(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    from pydicom.data import get_testdata_file

    data = Path(get_testdata_file("RG1_UNCR.dcm")).read_bytes()
    with caplog.at_level(logging.DEBUG):
        assert client.post("/images", files={"file": ("RG1.dcm", data)}).status_code == 201
        client.post("/verify", files={"file": ("RG1.dcm", data)}, data={"patient_id": "9RG1"})
        client.get("/images", params={"patient_id": "9RG1"})
        client.delete("/patients/9RG1")
    server_side = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("httpx"))
    assert '"DELETE /patients/{patient_id}" 200' in server_side  # access log: route templates only
    for secret in ("CompressedSamples", "19400305", "9RG1"):
        assert secret not in server_side
    assert len(server_side) < 20_000  # no pixel dumps


def test_gallery_errors_keep_patient_ids_out_of_logs_and_internals_out_of_answers(
    client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:  # noqa: ANN001
    from index import GalleryError

    service = client.app.state.service

    def broken(*args: object, **kwargs: object) -> int:
        raise GalleryError("database disk image is malformed (/srv/secret/gallery.sqlite)")

    monkeypatch.setattr(service, "delete_patient", broken)
    with caplog.at_level("INFO"):
        response = client.delete("/patients/PATIENT-12345")
    assert response.status_code == 500
    assert "secret" not in response.text and "malformed" not in response.text
    assert "server log" in response.json()["detail"]
    server_log = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("httpx"))
    assert "PATIENT-12345" not in server_log  # (httpx, the test's own client, logs the URL it sent)
    assert "/patients/{patient_id}" in server_log and "malformed" in server_log
