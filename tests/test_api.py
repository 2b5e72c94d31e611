"""HTTP API through FastAPI's TestClient: every endpoint's happy path, persistence, agreement.

The model has random weights (tests/conftest.py), so "same patient" cases use identical bytes
(score 1.0) and "different patient" cases pass an explicit threshold that unrelated phantoms
stay under (they score up to ~0.9 with random weights).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import dicom_dataset
from fastapi.testclient import TestClient
from PIL import Image

from models.net.embedder import Embedder

STRICT = "0.9999"  # a threshold only (near-)identical images reach with the random-weight model


# ------------------------------------------------------------------------------------------ fixtures
# embedder, make_client and client come from tests/conftest.py
@pytest.fixture(scope="module")
def images(phantom_images: list[Path]) -> list[bytes]:
    """18 phantom PNGs: patients 0-5, three studies each (index // 3 = patient)."""
    return [p.read_bytes() for p in phantom_images]


def dicom_bytes(
    pixels: np.ndarray, *, patient_id: str = "PAT-1", modality: str = "CR", view: str = "PA"
) -> bytes:
    """A CR DICOM with identifying attributes the service must never echo (name, birth date)."""
    from pydicom.uid import generate_uid

    ds = dicom_dataset(
        pixels,
        StudyInstanceUID=generate_uid(),
        SeriesInstanceUID=generate_uid(),
        Modality=modality,
        PatientID=patient_id,
        PatientName="Doe^Jane",
        PatientBirthDate="19700101",
        StudyDate="20240102",
        ViewPosition=view,
    )
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.uint16)


def enrol(client: TestClient, data: bytes, name: str = "x.png", **fields: object) -> dict:
    response = client.post(
        "/images", files={"file": (name, data)}, data={k: str(v) for k, v in fields.items()}
    )
    assert response.status_code == 201, response.text
    return response.json()["images"][0]


# ------------------------------------------------------------------------------------------ /embed
def test_embed_png_returns_unit_vector_and_size(
    client: TestClient, images: list[bytes], embedder: Embedder
) -> None:
    response = client.post("/embed", files={"file": ("a.png", images[0], "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    (result,) = body["results"]
    vector = np.asarray(result["embedding"], dtype=np.float32)
    assert body["model_id"] == result["model_id"] == embedder.model_id
    assert result["dim"] == vector.shape[0] == 128
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    assert result["image_size"] == {"width": 128, "height": 128}
    assert result["source_format"] == "png"
    assert result["identifiers"] == {}
    np.testing.assert_allclose(vector, embedder.embed([images[0]])[0], atol=1e-6)


def test_embed_base64_is_little_endian_float32(client: TestClient, images: list[bytes]) -> None:
    as_json = client.post("/embed", files={"file": ("a.png", images[0])}).json()["results"][0]
    as_b64 = client.post("/embed?encoding=base64", files={"file": ("a.png", images[0])}).json()["results"][0]
    assert as_b64["encoding"] == "base64"
    decoded = np.frombuffer(base64.b64decode(as_b64["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, np.asarray(as_json["embedding"], dtype=np.float32))


def test_embed_several_files(client: TestClient, images: list[bytes]) -> None:
    response = client.post("/embed", files=[("files", ("a.png", images[0])), ("files", ("b.png", images[3]))])
    assert response.status_code == 200, response.text
    assert [r["filename"] for r in response.json()["results"]] == ["a.png", "b.png"]


def test_embed_dicom_returns_uids_never_names_or_patient_id(client: TestClient, images: list[bytes]) -> None:
    data = dicom_bytes(png_pixels(images[0]), patient_id="SECRET-ID")
    response = client.post("/embed", files={"file": ("a.dcm", data, "application/dicom")})
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert set(result["identifiers"]) == {"SOPInstanceUID", "StudyInstanceUID", "ViewPosition"}
    assert result["identifiers"]["ViewPosition"] == "PA"
    assert result["source_format"] == "dicom"
    for secret in ("SECRET-ID", "Doe", "Jane", "19700101"):
        assert secret not in response.text


def test_embed_real_cr_dicom(client: TestClient) -> None:
    from pydicom.data import get_testdata_file

    data = Path(get_testdata_file("RG1_UNCR.dcm")).read_bytes()
    response = client.post("/embed", files={"file": ("RG1_UNCR.dcm", data)})
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["image_size"] == {"width": 1841, "height": 1955}
    assert "CompressedSamples" not in response.text and "19400305" not in response.text
    assert "9RG1" not in response.text  # the PatientID


# ------------------------------------------------------------------------------------------ /verify
def test_verify_two_identical_files(client: TestClient, images: list[bytes], embedder: Embedder) -> None:
    response = client.post("/verify", files={"file_a": ("a.png", images[0]), "file_b": ("b.png", images[0])})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mode"] == "pair"
    assert body["score"] == pytest.approx(1.0, abs=1e-6)
    assert body["same_patient"] is True
    assert 0.0 <= body["probability"] <= 1.0
    assert body["threshold"] == pytest.approx(embedder.calibration.threshold_for("1e-3"))
    assert body["far"] == pytest.approx(1e-3)
    assert body["a"]["filename"] == "a.png"


def test_verify_operating_points(client: TestClient, images: list[bytes], embedder: Embedder) -> None:
    files = {"file_a": ("a.png", images[0]), "file_b": ("b.png", images[3])}
    by_far = client.post("/verify", files=files, data={"far": "1e-2"}).json()
    assert by_far["threshold"] == pytest.approx(embedder.calibration.threshold_for("1e-2"))
    assert by_far["far"] == pytest.approx(1e-2)
    strict = client.post("/verify", files=files, data={"threshold": STRICT}).json()
    assert strict["threshold"] == pytest.approx(0.9999)
    assert strict["same_patient"] is False
    assert strict["score"] == pytest.approx(by_far["score"])
    assert strict["far"] == pytest.approx(embedder.calibration.far_at(0.9999))


def test_verify_gallery_ids_and_mixed(client: TestClient, images: list[bytes]) -> None:
    first = enrol(client, images[0], patient_id="p0")["image_id"]
    second = enrol(client, images[3], patient_id="p1")["image_id"]
    by_ids = client.post("/verify", data={"image_id_a": first, "image_id_b": second}).json()
    assert by_ids["a"] == {"image_id": first, "filename": None, "patient_id": "p0"}
    mixed = client.post("/verify", files={"file_b": ("b.png", images[3])}, data={"image_id_a": first}).json()
    assert mixed["score"] == pytest.approx(by_ids["score"], abs=1e-5)
    same = client.post("/verify", files={"file_a": ("a.png", images[0])}, data={"image_id_b": first}).json()
    assert same["same_patient"] is True and same["score"] == pytest.approx(1.0, abs=1e-6)


def test_verify_against_patient(client: TestClient, images: list[bytes]) -> None:
    ids = [enrol(client, images[i], patient_id="p0")["image_id"] for i in (0, 1)]
    enrol(client, images[2], patient_id="p0", collection="other")
    response = client.post("/verify", files={"file": ("q.png", images[0])}, data={"patient_id": "p0"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mode"] == "patient"
    assert body["compared_with"] == 2 and body["collection"] == "default"
    assert body["best_image_id"] == ids[0]
    assert body["score"] == body["best_score"] == pytest.approx(1.0, abs=1e-6)
    assert body["mean_score"] < body["best_score"]
    assert body["same_patient"] is True
    everywhere = client.post(
        "/verify", files={"file": ("q.png", images[0])}, data={"patient_id": "p0", "collection": "*"}
    ).json()
    assert everywhere["compared_with"] == 3
    # a gallery image against its own patient: itself is left out
    by_id = client.post("/verify", data={"image_id": ids[0], "patient_id": "p0", "threshold": STRICT}).json()
    assert by_id["compared_with"] == 1 and by_id["same_patient"] is False
    missing = client.post("/verify", files={"file": ("q.png", images[0])}, data={"patient_id": "nobody"})
    assert missing.status_code == 404 and "nobody" in missing.json()["detail"]


def test_verify_and_search_agree_on_every_pair(client: TestClient, images: list[bytes]) -> None:
    ids = [enrol(client, images[i], patient_id=f"p{i // 3}")["image_id"] for i in range(6)]
    for threshold in (None, "0.75"):
        extra = {} if threshold is None else {"threshold": threshold}
        for query in ids:
            matches = client.post("/search", data={"image_id": query, "k": 10, **extra}).json()["matches"]
            assert len(matches) == 5
            for match in matches:
                pair = client.post(
                    "/verify", data={"image_id_a": query, "image_id_b": match["image_id"], **extra}
                ).json()
                assert pair["score"] == match["score"]
                assert pair["same_patient"] == match["same_patient"]
    # a threshold exactly at a pair's score: both call it the same patient
    match = client.post("/search", data={"image_id": ids[0], "k": 1}).json()["matches"][0]
    at = {"threshold": repr(match["score"])}
    assert client.post("/search", data={"image_id": ids[0], "k": 1, **at}).json()["matches"][0][
        "same_patient"
    ]
    assert client.post("/verify", data={"image_id_a": ids[0], "image_id_b": match["image_id"], **at}).json()[
        "same_patient"
    ]


# ------------------------------------------------------------------------------------------ /images
def test_enrol_png_with_metadata(client: TestClient, images: list[bytes], embedder: Embedder) -> None:
    response = client.post(
        "/images",
        files={"file": ("a.png", images[0])},
        data={
            "patient_id": "p0",
            "collection": "ward",
            "view": "PA",
            "split": "train",
            "study_date": "2024-01-02",
            "study_instance_uid": "1.2.3",
            "tags": json.dumps({"site": "A", "n": 3, "ok": True}),
        },
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["model_id"] == embedder.model_id
    assert body["operating_point"]["far"] == pytest.approx(1e-3)
    item = body["images"][0]
    assert item["matches"] == [] and item["alert"] is None and item["duplicate_of"] is None
    image = item["image"]
    assert image["patient_id"] == "p0" and image["collection"] == "ward"
    assert image["view"] == "PA" and image["split"] == "train" and image["study_date"] == "2024-01-02"
    assert image["study_instance_uid"] == "1.2.3"
    assert image["tags"] == {"site": "A", "n": "3", "ok": "true"}
    assert image["stored"] is True and image["source_path"] is None
    assert len(image["sha256"]) == 64
    fetched = client.get(f"/images/{item['image_id']}")
    assert fetched.status_code == 200 and fetched.json() == image


def test_enrol_patient_from_dicom_or_unknown(client: TestClient, images: list[bytes]) -> None:
    from_dicom = enrol(client, dicom_bytes(png_pixels(images[0]), patient_id="D-7"), "a.dcm")["image"]
    assert from_dicom["patient_id"] == "D-7"
    assert from_dicom["view"] == "PA" and from_dicom["study_date"] == "20240102"
    assert from_dicom["sop_instance_uid"] and from_dicom["study_instance_uid"]
    overridden = enrol(client, dicom_bytes(png_pixels(images[1]), patient_id="D-7"), "b.dcm", patient_id="X")
    assert overridden["image"]["patient_id"] == "X"
    unknown = enrol(client, images[3])
    assert unknown["image"]["patient_id"] is None and unknown["alert"] is None
    # an unidentified image is still searchable
    hits = client.post("/search", files={"file": ("q.png", images[3])}).json()["matches"]
    assert hits[0]["image_id"] == unknown["image_id"] and hits[0]["patient_id"] is None


def test_enrol_matches_are_top5_of_the_collection_without_itself(
    client: TestClient, images: list[bytes]
) -> None:
    for i in range(7):
        enrol(client, images[i], patient_id=f"p{i // 3}")
    enrol(client, images[8], patient_id="elsewhere", collection="other")
    item = enrol(client, images[0], patient_id="p9")  # same bytes, another patient: a new image
    assert len(item["matches"]) == 5
    assert item["matches"][0]["image_id"] == 1 and item["matches"][0]["score"] == pytest.approx(1.0, abs=1e-6)
    assert all(m["collection"] == "default" and m["image_id"] != item["image_id"] for m in item["matches"])
    assert [m["score"] for m in item["matches"]] == sorted(
        (m["score"] for m in item["matches"]), reverse=True
    )


def test_enrol_alert_matches_other_patient_and_duplicate_of(client: TestClient, images: list[bytes]) -> None:
    first = enrol(client, images[0], patient_id="alice")
    again = enrol(client, images[0], patient_id="bob", threshold=STRICT)
    assert again["duplicate_of"] == first["image_id"]
    alert = again["alert"]
    assert alert["kind"] == "matches_other_patient"
    assert alert["other_patient_id"] == "alice" and alert["other_image_id"] == first["image_id"]
    assert alert["score"] == pytest.approx(1.0, abs=1e-6)
    assert alert["own_images"] == 0 and alert["own_best_score"] is None
    assert "alice" in alert["message"]


def test_enrol_is_idempotent_for_a_retried_request(client: TestClient, images: list[bytes]) -> None:
    """A client that never saw its 201 (a crash, a timeout) sends the request again: the file is not
    stored twice; the answer names the stored image. Other files of the request are enrolled."""
    before = client.get("/images", params={"collection": "retry"}).json()["total"]
    first = enrol(client, images[4], patient_id="dora", collection="retry")
    assert first["already_enrolled"] is False
    again = client.post(
        "/images",
        files=[("files", ("x.png", images[4])), ("files", ("y.png", images[5]))],
        data={"patient_id": "dora", "collection": "retry"},
    )
    assert again.status_code == 201
    retried, new = again.json()["images"]
    assert retried["already_enrolled"] is True and retried["image_id"] == first["image_id"]
    assert retried["alert"] is None and retried["matches"] == []
    assert new["already_enrolled"] is False and new["image_id"] != first["image_id"]
    assert client.get("/images", params={"collection": "retry"}).json()["total"] == before + 2
    # the same file under another patient is a new claim: stored, and the wrong-patient check decides
    other = enrol(client, images[4], patient_id="erin", collection="retry")
    assert other["already_enrolled"] is False and other["duplicate_of"] == first["image_id"]


def test_enrol_alert_no_match_with_own_images(client: TestClient, images: list[bytes]) -> None:
    enrol(client, images[0], patient_id="carol")
    enrol(client, images[1], patient_id="carol")
    odd = enrol(client, images[9], patient_id="carol", threshold=STRICT)
    assert odd["alert"]["kind"] == "no_match_with_own_images"
    assert odd["alert"]["own_images"] == 2 and odd["alert"]["own_best_score"] < 0.9999
    consistent = enrol(client, images[0], patient_id="carol", threshold=STRICT)
    assert consistent["alert"] is None


def test_enrol_several_files_all_or_nothing(client: TestClient, images: list[bytes]) -> None:
    ok = client.post(
        "/images",
        files=[
            ("files", ("a.png", images[0])),
            ("files", ("b.png", images[3])),
            ("files", ("c.png", images[0])),
        ],
        data={"patient_id": "p0"},
    )
    assert ok.status_code == 201, ok.text
    enrolled = ok.json()["images"]
    assert [i["filename"] for i in enrolled] == ["a.png", "b.png", "c.png"]
    assert enrolled[2]["duplicate_of"] == enrolled[0]["image_id"]  # same bytes twice in one request
    bad = client.post(
        "/images",
        files=[("files", ("d.png", images[6])), ("files", ("broken.png", images[6][:200]))],
        data={"patient_id": "p2"},
    )
    assert bad.status_code == 422 and "broken.png" in bad.json()["detail"]
    assert client.get("/images").json()["total"] == 3


def test_list_get_delete(client: TestClient, images: list[bytes]) -> None:
    for i in range(6):
        enrol(client, images[i], patient_id=f"p{i // 3}", collection="a" if i < 4 else "b")
    page = client.get("/images", params={"offset": 1, "limit": 2}).json()
    assert page["total"] == 6 and [i["image_id"] for i in page["items"]] == [2, 3]
    assert client.get("/images", params={"patient_id": "p1"}).json()["total"] == 3
    assert client.get("/images", params={"collection": "b"}).json()["total"] == 2
    assert client.get("/images", params={"patient_id": "p1", "collection": "a"}).json()["total"] == 1
    assert client.get("/images", params={"collection": "*"}).json()["total"] == 6

    assert client.delete("/images/2").json() == {"deleted": 1}
    assert client.get("/images/2").status_code == 404
    assert client.delete("/images/2").status_code == 404
    assert client.delete("/patients/p1", params={"collection": "b"}).json() == {"deleted": 2}
    assert client.delete("/patients/p1").json() == {"deleted": 1}
    assert client.delete("/patients/p1").status_code == 404
    assert client.get("/images").json()["total"] == 2
    # a deleted image is gone from search too
    hits = client.post("/search", files={"file": ("q.png", images[1])}, data={"collection": "*", "k": 10})
    assert 2 not in [m["image_id"] for m in hits.json()["matches"]]


# ------------------------------------------------------------------------------------------ /search
def test_search_by_file_and_by_image_id(client: TestClient, images: list[bytes]) -> None:
    for i in range(6):
        enrol(client, images[i], patient_id=f"p{i // 3}", split="train" if i < 3 else "test")
    enrol(client, images[0], patient_id="p0", collection="other")
    by_file = client.post("/search", files={"file": ("q.png", images[4])}, data={"k": 3}).json()
    assert by_file["collection"] == "default" and by_file["query"]["filename"] == "q.png"
    assert len(by_file["matches"]) == 3 and by_file["matches"][0]["image_id"] == 5
    assert by_file["matches"][0]["same_patient"] is True
    by_id = client.post("/search", data={"image_id": 5, "k": 10}).json()
    assert 5 not in [m["image_id"] for m in by_id["matches"]] and len(by_id["matches"]) == 5
    assert by_id["query"] == {"image_id": 5, "filename": None, "patient_id": "p1"}
    everywhere = client.post("/search", data={"image_id": 1, "k": 10, "collection": "*"}).json()
    assert {m["collection"] for m in everywhere["matches"]} == {"default", "other"}
    assert everywhere["matches"][0] == {
        "image_id": 7,
        "patient_id": "p0",
        "collection": "other",
        "score": pytest.approx(1.0, abs=1e-6),
        "cosine": pytest.approx(1.0, abs=1e-6),
        "same_patient": True,
    }
    own_collection = client.post("/search", data={"image_id": 7}).json()
    assert own_collection["collection"] == "other" and own_collection["matches"] == []


def test_search_filters_and_only_matches(client: TestClient, images: list[bytes]) -> None:
    for i in range(6):
        enrol(client, images[i], patient_id=f"p{i // 3}", split="train" if i % 2 else "test")
    only_p1 = client.post("/search", files={"file": ("q.png", images[0])}, data={"patient_id": "p1"}).json()
    assert {m["patient_id"] for m in only_p1["matches"]} == {"p1"} and len(only_p1["matches"]) == 3
    tests = client.post(
        "/search", files={"file": ("q.png", images[0])}, data={"split": "train", "k": 2}
    ).json()
    assert len(tests["matches"]) == 2
    assert all(client.get(f"/images/{m['image_id']}").json()["split"] == "train" for m in tests["matches"])
    strict = client.post(
        "/search", files={"file": ("q.png", images[0])}, data={"only_matches": "true", "threshold": STRICT}
    ).json()
    assert [m["image_id"] for m in strict["matches"]] == [1]
    assert strict["operating_point"]["threshold"] == pytest.approx(0.9999)


# ------------------------------------------------------------------------------------------ /duplicates
def test_duplicates_pairs_clusters_conflicts(client: TestClient, images: list[bytes]) -> None:
    twice = [("files", ("a.png", images[0])), ("files", ("a2.png", images[0]))]
    assert client.post("/images", files=twice, data={"patient_id": "alice"}).status_code == 201  # 1, 2:
    # the same picture twice for one patient (a retry of a stored file would not be stored again)
    enrol(client, images[0], patient_id="bob")  # 3: conflicts with 1 and 2
    enrol(client, images[3], patient_id="carol")  # 4
    enrol(client, images[3])  # 5: unknown patient, never a conflict
    enrol(client, images[6], patient_id="dave")  # 6: alone
    body = client.get("/duplicates", params={"threshold": STRICT}).json()
    assert body["total_pairs"] == 4 and body["total_conflicts"] == 2
    pairs = {(p["a"]["image_id"], p["b"]["image_id"]): p for p in body["pairs"]}
    assert set(pairs) == {(1, 2), (1, 3), (2, 3), (4, 5)}
    assert pairs[(1, 3)]["conflict"] and pairs[(2, 3)]["conflict"] and not pairs[(1, 2)]["conflict"]
    assert not pairs[(4, 5)]["conflict"]
    assert [c["image_ids"] for c in body["clusters"]] == [[1, 2, 3], [4, 5]]
    assert body["clusters"][0] == {"image_ids": [1, 2, 3], "patient_ids": ["alice", "bob"], "conflict": True}
    assert body["clusters"][1]["patient_ids"] == ["carol", None] and not body["clusters"][1]["conflict"]
    assert pairs[(4, 5)]["cluster"] == 1

    conflicts = client.get("/duplicates", params={"threshold": STRICT, "conflicts_only": "true"}).json()
    assert conflicts["total_pairs"] == 2 and all(p["conflict"] for p in conflicts["pairs"])
    assert [c["image_ids"] for c in conflicts["clusters"]] == [[1, 2, 3]]

    page = client.get("/duplicates", params={"threshold": STRICT, "offset": 1, "limit": 2}).json()
    assert len(page["pairs"]) == 2 and page["total_pairs"] == 4
    scores = [p["score"] for p in body["pairs"]]
    assert scores == sorted(scores, reverse=True)

    default_point = client.get("/duplicates").json()
    assert default_point["total_pairs"] >= 4 and default_point["operating_point"]["far"] == pytest.approx(
        1e-3
    )


def test_duplicates_across_collections(client: TestClient, images: list[bytes]) -> None:
    enrol(client, images[0], patient_id="alice", collection="a")
    enrol(client, images[0], patient_id="bob", collection="b")
    assert client.get("/duplicates", params={"threshold": STRICT}).json()["total_pairs"] == 0
    assert (
        client.get("/duplicates", params={"threshold": STRICT, "collection": "a"}).json()["total_pairs"] == 0
    )
    across = client.get("/duplicates", params={"threshold": STRICT, "collection": "*"}).json()
    assert across["total_pairs"] == 1 and across["total_conflicts"] == 1 and across["collection"] is None


# ------------------------------------------------------------------------------------------ persistence
def test_gallery_survives_a_restart(
    make_client: Callable[..., TestClient], tmp_path: Path, images: list[bytes]
) -> None:
    first = make_client(tmp_path / "g")
    ids = [enrol(first, images[i], patient_id=f"p{i // 3}")["image_id"] for i in range(4)]
    first.delete(f"/images/{ids[1]}")
    first.__exit__(None, None, None)

    second = make_client(tmp_path / "g")
    listing = second.get("/images").json()
    assert [i["image_id"] for i in listing["items"]] == [ids[0], ids[2], ids[3]]
    hits = second.post("/search", files={"file": ("q.png", images[2])}).json()["matches"]
    assert hits[0]["image_id"] == ids[2] and hits[0]["score"] == pytest.approx(1.0, abs=1e-6)
    assert second.get("/readyz").status_code == 200
    new = enrol(second, images[5], patient_id="p1")
    assert new["image_id"] > ids[3]


# ------------------------------------------------------------------------------------------ health, docs
def test_health_ready_metrics(client: TestClient, images: list[bytes], embedder: Embedder) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    enrol(client, images[0], patient_id="p0")
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["model_id"] == embedder.model_id and ready.json()["gallery_images"] == 1
    assert ready.json()["index"] == "Flat" and ready.json()["index_rebuilding"] is False  # auto, small
    client.post("/embed", files={"file": ("a.png", images[0])})
    client.get("/images/12345")
    text = client.get("/metrics").text
    assert 'cxr_reid_requests_total{method="POST",route="/images",status="201"} 1.0' in text
    assert 'cxr_reid_requests_total{method="GET",route="/images/{image_id}",status="404"} 1.0' in text
    assert "cxr_reid_request_duration_seconds_bucket" in text
    assert "cxr_reid_embeddings_total 2.0" in text
    assert "cxr_reid_gallery_images 1.0" in text


def test_openapi_documents_every_route(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    routes = {(path, method) for path, ops in schema["paths"].items() for method in ops}
    expected = {
        ("/embed", "post"),
        ("/verify", "post"),
        ("/images", "post"),
        ("/images", "get"),
        ("/images/{image_id}", "get"),
        ("/images/{image_id}", "delete"),
        ("/patients/{patient_id}", "delete"),
        ("/search", "post"),
        ("/duplicates", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    }
    assert expected <= routes
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            assert op.get("summary"), f"{method} {path} has no summary"
    assert client.get("/docs").status_code == 200
