"""POST/GET/DELETE /calibration and `cxr-reid calibrate --data-dir`: a site calibration fitted on the
gallery's labelled images, refused when they are too few, in force across restarts, and named in
every response that decides "same patient"."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_site
from fastapi.testclient import TestClient

from app.service.keys import KeyStore
from index import Gallery, NewImage
from models.net.embedder import Embedder


def fill_gallery(data_dir: Path, embedder: Embedder, patients: int, per_patient: int, seed: int = 0) -> None:
    """Labelled synthetic vectors in a real gallery (SQLite + FAISS) of the test model, patients
    alternating between two collections."""
    vectors, ids = synthetic_site(patients, per_patient, noise=1.2, seed=seed, dim=embedder.dim)
    images = [
        NewImage(patient_id=f"site-{p[1:]}", collection="ward" if int(p[1:]) % 2 else "default") for p in ids
    ]
    with Gallery(data_dir, dim=embedder.dim, model_id=embedder.model_id) as gallery:
        gallery.add(vectors, images)


def test_site_calibration_lifecycle(
    tmp_path: Path, embedder: Embedder, make_client: Callable[..., TestClient]
) -> None:
    data_dir = tmp_path / "data"
    fill_gallery(data_dir, embedder, patients=40, per_patient=3)  # 120 images: 7,020 impostor pairs
    client = make_client(data_dir, far="1e-2")

    shipped = client.get("/calibration").json()
    assert shipped["calibration"]["source"] == "shipped"
    assert client.get("/readyz").json()["operating_point"]["calibration"]["source"] == "shipped"

    refused = client.post("/calibration", data={"far": "1e-2,1e-3"})
    assert refused.status_code == 409
    assert "FAR 1e-3 needs at least 10,000" in refused.json()["detail"]
    assert "unchanged" in refused.json()["detail"]
    assert client.get("/calibration").json() == shipped  # nothing changed

    assert client.post("/calibration", data={"far": "1e-3"}).status_code == 422  # default FAR left out
    assert client.post("/calibration", data={"far": "often"}).status_code == 422
    assert client.post("/calibration", data={"far": "2"}).status_code == 422

    fitted = client.post("/calibration", data={"far": "1e-2", "bootstrap": "50"})
    assert fitted.status_code == 200, fitted.text
    body = fitted.json()
    assert body["calibration"]["source"] == "site" and body["calibration"]["patients"] == 40
    assert body["calibration"]["images"] == 120 and body["calibration"]["calibration_id"] >= 1
    assert body["provenance"]["collection"] == "*" and body["provenance"]["model_id"] == embedder.model_id
    low, high = body["threshold_ci"]["1e-2"]
    assert low <= body["thresholds"]["1e-2"] <= high + 1e-6

    # every deciding response names it, and uses its threshold
    site_threshold = body["thresholds"]["1e-2"]
    ready = client.get("/readyz").json()["operating_point"]
    assert ready["calibration"]["source"] == "site" and ready["threshold"] == site_threshold
    dups = client.get("/duplicates", params={"collection": "*"}).json()
    assert dups["operating_point"]["calibration"]["calibration_id"] == body["calibration"]["calibration_id"]
    search = client.post("/search", data={"image_id": "1", "collection": "*"}).json()
    assert search["operating_point"]["threshold"] == site_threshold
    verify = client.post("/verify", data={"image_id_a": "1", "image_id_b": "2"}).json()
    assert verify["calibration"]["source"] == "site" and verify["threshold"] == site_threshold
    # a FAR the site data cannot resolve is refused, not extrapolated
    assert (
        client.post("/verify", data={"image_id_a": "1", "image_id_b": "2", "far": "1e-4"}).status_code == 422
    )

    # in force after a restart
    client.__exit__(None, None, None)
    again = make_client(data_dir, far="1e-2")
    assert again.get("/calibration").json()["calibration"] == body["calibration"]

    # one collection only
    ward = again.post("/calibration", data={"far": "1e-2", "collection": "ward", "bootstrap": "0"})
    assert ward.status_code == 200 and ward.json()["calibration"]["images"] == 60
    assert ward.json()["calibration"]["calibration_id"] > body["calibration"]["calibration_id"]

    cleared = again.delete("/calibration")
    assert cleared.status_code == 200 and cleared.json()["calibration"]["source"] == "shipped"
    assert again.get("/readyz").json()["operating_point"]["calibration"]["source"] == "shipped"


def test_calibration_needs_the_api_key(tmp_path: Path, make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_keys="secret")
    assert client.post("/calibration").status_code == 401
    assert client.delete("/calibration").status_code == 401
    assert client.get("/calibration", headers={"X-API-Key": "secret"}).status_code == 200


def test_cli_calibrates_a_stopped_gallery(tmp_path: Path, tiny_checkpoint: Path, embedder: Embedder) -> None:
    from app.cli import main

    data_dir = tmp_path / "data"
    fill_gallery(data_dir, embedder, patients=30, per_patient=2, seed=1)
    common = ["calibrate", "--data-dir", str(data_dir), "--model", str(tiny_checkpoint), "--bootstrap", "0"]
    assert main(common) == 1  # FAR 1e-3 and 1e-4 cannot be resolved on 60 images: refused
    with Gallery(data_dir, dim=embedder.dim, model_id=embedder.model_id) as gallery:
        assert gallery.site_calibration() is None
    assert main([*common, "--far", "1e-2,1e-3"]) == 1
    assert main(["calibrate", "--data-dir", str(data_dir), "--out", "x.pt"]) == 2  # --out is for --manifest
    assert main(["calibrate", "--manifest", "m.csv"]) == 2  # --manifest needs --out
    assert main(["calibrate", "--far", "1e-2,x"]) == 2


def test_as_norm_decisions_agree_across_routes(
    tmp_path: Path, embedder: Embedder, make_client: Callable[..., TestClient]
) -> None:
    """With a site calibration in AS-norm units, /verify, /search and /duplicates score every pair
    alike, and /duplicates misses no pair /verify calls the same patient."""
    from app.service.scoring import record_key

    data_dir = tmp_path / "data"
    fill_gallery(data_dir, embedder, patients=40, per_patient=3, seed=7)
    client = make_client(data_dir, far="1e-2")
    body = client.post("/calibration", data={"far": "1e-2", "bootstrap": "0"}).json()
    assert body["calibration"]["score_norm"].startswith("as-norm")
    threshold = body["thresholds"]["1e-2"]
    assert threshold > 1.0  # in standard deviations, not a cosine

    pair = client.post("/verify", data={"image_id_a": "1", "image_id_b": "5"}).json()
    assert pair["score"] != pytest.approx(pair["cosine"]) and pair["threshold"] == threshold
    assert (
        client.post("/verify", data={"image_id_a": "1", "image_id_b": "5", "threshold": "2.5"}).status_code
        == 200
    )

    matches = client.post("/search", data={"image_id": "1", "k": "10", "collection": "*"}).json()["matches"]
    for match in matches:
        again = client.post("/verify", data={"image_id_a": "1", "image_id_b": str(match["image_id"])}).json()
        assert again["score"] == match["score"] and again["same_patient"] == match["same_patient"]
    assert [m["score"] for m in matches] == sorted((m["score"] for m in matches), reverse=True)

    service = client.app.state.service
    point = service.operating_point()
    records, vectors = service.gallery.list_images(limit=1000)[0], None
    vectors = [service.gallery.get_vector(r.image_id) for r in records]
    expected = set()
    for i, a in enumerate(records):
        for j in range(i + 1, len(records)):
            b = records[j]
            verdict = service.verify_pair(vectors[i], record_key(a), vectors[j], record_key(b), point=point)
            if verdict.same_patient:
                expected.add((a.image_id, b.image_id))
    found = client.get("/duplicates", params={"collection": "*", "limit": "1000"}).json()
    assert {(p["a"]["image_id"], p["b"]["image_id"]) for p in found["pairs"]} == expected
    assert expected  # the test means something: some pairs are accepted


def test_serving_a_site_calibrated_checkpoint(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """`cxr-reid calibrate --manifest` writes SITE.pt; serving it uses its site calibration (AS-norm
    included) with no gallery calibration at all."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings
    from models.imaging.phantom import write_phantom_set
    from models.training.site import calibrate_checkpoint

    manifest = write_phantom_set(tmp_path / "site", 25, 3, size=64, seed=9)
    site = tmp_path / "site.pt"
    calibrate_checkpoint(
        manifest, site, model=tiny_checkpoint, fars=("1e-2",), default_far="1e-2", bootstrap=0, progress=False
    )
    settings = Settings(data_dir=tmp_path / "data", model_path=site, far="1e-2")
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz").json()
        assert ready["operating_point"]["calibration"]["source"] == "site"
        assert ready["operating_point"]["calibration"]["score_norm"].startswith("as-norm")
        images = sorted((tmp_path / "site" / "images").rglob("*.png"))
        files = {"file_a": ("a.png", images[0].read_bytes()), "file_b": ("b.png", images[1].read_bytes())}
        pair = client.post("/verify", files=files).json()
        assert pair["calibration"]["source"] == "site" and pair["score"] != pytest.approx(pair["cosine"])


def test_a_key_limited_to_collections_cannot_change_the_calibration(
    tmp_path: Path, embedder: Embedder, make_client: Callable[..., TestClient]
) -> None:
    """The calibration decides for every collection: an admin key limited to one may not fit or clear
    it (and so cannot move what the other collections see); an unlimited admin key may."""
    data_dir = tmp_path / "data"
    fill_gallery(data_dir, embedder, patients=40, per_patient=3)
    store = KeyStore(data_dir / "keys.json")
    ward_admin = {"X-API-Key": store.add("admin", collections=["ward"])[1]}
    admin = {"X-API-Key": store.add("admin")[1]}
    client = make_client(data_dir, far="1e-2")
    before = client.get("/calibration", headers=ward_admin).json()
    for answer in (
        client.post("/calibration", data={"far": "1e-2", "collection": "ward"}, headers=ward_admin),
        client.delete("/calibration", headers=ward_admin),
    ):
        assert answer.status_code == 403 and "every collection" in answer.json()["detail"]
    assert client.get("/calibration", headers=admin).json() == before  # nothing moved
    fitted = client.post("/calibration", data={"far": "1e-2", "bootstrap": "0"}, headers=admin)
    assert fitted.status_code == 200 and fitted.json()["calibration"]["source"] == "site"


def test_noise_filed_under_patient_ids_is_not_calibrated_on(
    tmp_path: Path, embedder: Embedder, make_client: Callable[..., TestClient]
) -> None:
    """230 images with no identity in them (as noise images that pass the quality gate embed) would
    move every collection's threshold: refused with 409, the calibration in force kept."""
    data_dir = tmp_path / "data"
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(230, embedder.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with Gallery(data_dir, dim=embedder.dim, model_id=embedder.model_id) as gallery:
        gallery.add(vectors, [NewImage(patient_id=f"noise-{i // 3}") for i in range(230)])
    client = make_client(data_dir, far="1e-2")
    before = client.get("/calibration").json()
    refused = client.post("/calibration", data={"far": "1e-2", "bootstrap": "0"})
    assert refused.status_code == 409 and "score alike" in refused.json()["detail"]
    assert client.get("/calibration").json() == before
