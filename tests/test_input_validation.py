"""Ids, offsets and labels from clients: bounded, clean, refused with the reason (issue 10, item 7)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.api.dependencies import MAX_LABEL_CHARS, clean_label


@pytest.fixture
def client(make_client) -> TestClient:  # noqa: ANN001
    return make_client(raise_server_exceptions=False)


def _enrol(client: TestClient, image: Path, **data: str):  # noqa: ANN202
    return client.post("/images", files={"file": (image.name, image.read_bytes())}, data=data)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("   ", "only whitespace"),
        ("p" * (MAX_LABEL_CHARS + 1), f"257 characters long; at most {MAX_LABEL_CHARS}"),
        ("p\x001", "control characters"),
        ("p\n1", "control characters"),
        ("p\ufffd1", "not valid UTF-8"),
    ],
    ids=["whitespace", "too-long", "nul", "newline", "replacement-char"],
)
def test_bad_labels_are_refused(value: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        clean_label(value)


def test_labels_are_stripped_and_empty_means_not_given() -> None:
    assert clean_label("  p1 ") == "p1"
    assert clean_label("") is None and clean_label(None) is None
    assert clean_label("José Ünal-3") == "José Ünal-3"


def test_enrolment_refuses_bad_patient_ids_and_stores_nothing(
    client: TestClient, phantom_images: list[Path]
) -> None:
    for value, reason in (("   ", "only whitespace"), ("x" * 10_000, "at most 256"), ("a\x00b", "control")):
        response = _enrol(client, phantom_images[0], patient_id=value)
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["errors"][0]["field"] == "body.patient_id" and reason in body["detail"]
    assert client.get("/images").json()["total"] == 0
    ok = _enrol(client, phantom_images[0], patient_id="  p1  ")
    assert ok.status_code == 201 and ok.json()["images"][0]["image"]["patient_id"] == "p1"
    assert client.get("/images", params={"patient_id": " p1 "}).json()["total"] == 1


def test_ids_and_offsets_are_bounded_and_written_in_digits(
    client: TestClient, phantom_images: list[Path]
) -> None:
    image_id = _enrol(client, phantom_images[0], patient_id="p1").json()["images"][0]["image_id"]
    assert client.get(f"/images/{image_id}").status_code == 200
    for path in (
        f"/images/%20{image_id}",
        f"/images/+{image_id}",
        "/images/9223372036854775808",
        "/images/0",
    ):
        response = client.get(path)
        assert response.status_code == 422, (path, response.text)
        assert response.json()["errors"][0]["field"] == "path.image_id"
    huge = client.get("/images", params={"offset": 2**63})
    assert huge.status_code == 422 and huge.json()["errors"][0]["field"] == "query.offset"
    assert client.get("/images", params={"offset": 2**63 - 1}).json()["items"] == []
    assert client.get("/duplicates", params={"offset": 2**63}).status_code == 422
    assert client.delete("/patients/%00p").status_code == 422
