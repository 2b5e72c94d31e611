"""A full disk on enrolment (issue 10): 507 with what to do, the request rolled back, nothing
acknowledged lost, and enrolment works again once there is space. Needs root to mount a small
tmpfs as the data dir (CI runs as root); skipped elsewhere."""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index import Gallery, GalleryFullError, NewImage


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)]).returncode
    ):
        pytest.skip("needs root and mount to make a small file system")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _noise_png(seed: int, side: int = 256) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)  # incompressible
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_gallery_rolls_back_a_write_that_fills_the_disk(small_disk: Path) -> None:
    rng = np.random.default_rng(0)
    gallery = Gallery(small_disk / "data", dim=8, model_id="m")
    kept = 0
    with pytest.raises(GalleryFullError, match="is full; nothing of this request was kept"):
        for i in range(100):
            vector = rng.standard_normal((2, 8)).astype(np.float32)
            vector /= np.linalg.norm(vector, axis=1, keepdims=True)
            gallery.add(vector, [NewImage(patient_id=f"p{i}", blob=os.urandom(100_000)) for _ in range(2)])
            kept += 2
    assert kept > 0 and len(gallery) == kept and gallery.is_consistent()
    blobs = [p for p in (small_disk / "data" / "images").rglob("*") if p.is_file()]
    assert len(blobs) == kept  # the failed request left no file behind
    gallery.delete_patient("p0")
    gallery.delete_patient("p1")
    vector = np.eye(8, dtype=np.float32)[:1]
    gallery.add(vector, [NewImage(patient_id="after", blob=os.urandom(50_000))])  # space again: works
    assert len(gallery) == kept - 4 + 1
    gallery.close()


def test_api_answers_507_and_keeps_every_acknowledged_image(make_client, small_disk: Path) -> None:  # noqa: ANN001
    client = make_client(small_disk / "data", raise_server_exceptions=False)
    acknowledged, answer = 0, None
    for i in range(60):
        answer = client.post(
            "/images", files={"file": (f"{i}.png", _noise_png(i))}, data={"patient_id": f"p{i}"}
        )
        if answer.status_code != 201:
            break
        acknowledged += 1
    assert answer is not None and answer.status_code == 507, answer.text
    assert "is full" in answer.json()["detail"] and "send it again" in answer.json()["detail"]
    assert acknowledged > 0 and client.get("/images").json()["total"] == acknowledged
    assert client.get("/readyz").status_code == 200
