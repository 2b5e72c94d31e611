"""/duplicates is bounded (issue 10, item 2): a floor on the threshold, a cap on pairs, one scan at
a time, and a report reused for paging until the gallery changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index import Gallery, GalleryValidationError, NewImage


def test_threshold_below_the_far_1e_1_point_is_refused(make_client) -> None:  # noqa: ANN001
    client = make_client()
    floor = client.app.state.service.duplicates_floor()
    response = client.get("/duplicates", params={"threshold": -1, "collection": "*"})
    assert response.status_code == 422
    assert "below" in response.json()["detail"] and "FAR 0.1" in response.json()["detail"]
    assert client.get("/duplicates", params={"threshold": floor}).status_code == 200


def test_the_report_is_computed_once_per_gallery_generation(
    make_client, phantom_images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    client = make_client()
    service = client.app.state.service
    for i, path in enumerate(phantom_images[:4]):
        client.post("/images", files={"file": (path.name, path.read_bytes())}, data={"patient_id": f"p{i}"})
    scans = []
    compute = service._compute_duplicates
    monkeypatch.setattr(service, "_compute_duplicates", lambda *a: scans.append(1) or compute(*a))
    threshold = service.duplicates_floor()
    first = client.get("/duplicates", params={"threshold": threshold, "limit": 1}).json()
    second = client.get("/duplicates", params={"threshold": threshold, "limit": 1, "offset": 1}).json()
    client.get("/duplicates", params={"threshold": threshold, "conflicts_only": True})
    assert len(scans) == 1  # paging and filtering reuse the report
    assert first["total_pairs"] == second["total_pairs"] and first["total_pairs"] >= 2
    assert first["pairs"][0] != second["pairs"][0]
    path = phantom_images[5]
    client.post("/images", files={"file": (path.name, path.read_bytes())}, data={"patient_id": "p9"})
    client.get("/duplicates", params={"threshold": threshold})
    assert len(scans) == 2  # the gallery changed: scanned again


def test_a_scan_with_too_many_pairs_stops_with_the_reason(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal(16).astype(np.float32)
    vectors = base + 0.01 * rng.standard_normal((60, 16)).astype(np.float32)  # all near one point
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with Gallery(tmp_path / "g", dim=16, model_id="m") as gallery:
        gallery.add(vectors, [NewImage(patient_id=f"p{i}") for i in range(60)])
        assert len(gallery.duplicates(0.5, collection=None)) == 60 * 59 // 2
        with pytest.raises(GalleryValidationError, match="more than 100 pairs reach the threshold"):
            gallery.duplicates(0.5, collection=None, max_pairs=100)
