"""A model change without downtime on a PostgreSQL gallery (a real private cluster): ``cxr-reid
reindex --stage-only`` stages the new network's vectors while the service serves the old ones, then
``cxr-reid reindex`` switches; a service started with ``CXR_REID_NEXT_MODEL_PATH`` swaps its network
at that moment, and no answer compares a vector of one network with a vector of the other. Requests
wait while it swaps; one that read the database in the instant between the switch's commit and the
service noticing it answers 503 with Retry-After (nothing mixed), and its retry is served.

The check for mixing: a search with an enrolled radiograph finds that image itself at cosine 1. A
query embedded by one network against the stored vector of the other scores far below 1 (two random
networks), so every answer during the switch must be the image itself at ~1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import save_random_checkpoint

from index import Gallery, ModelSwitchingError, NewImage
from models.net.embedder import Embedder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def next_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another random network of the tiny checkpoint's shape: a different model id, other vectors."""
    return save_random_checkpoint(
        tmp_path_factory.mktemp("next") / "next.pt",
        name="tiny-next",
        seed=7,
        embedding_dim=128,
        genuine=(0.8, 0.08, 500),
        impostor=(0.2, 0.15, 20_000),
    )


def test_reindex_switches_a_running_service_without_mixing_networks(
    make_client,
    database_url: str,
    tmp_path: Path,
    phantom_images: list[Path],
    next_checkpoint: Path,  # noqa: ANN001
) -> None:
    client = make_client(
        tmp_path / "replica",
        database_url=database_url,
        blob_dir=tmp_path / "blobs",
        next_model_path=next_checkpoint,
        follow_poll_seconds=0.2,
    )
    service = client.app.state.service
    old_model = service.model_id
    for i, path in enumerate(phantom_images[:9]):
        files = {"file": (path.name, path.read_bytes())}
        assert client.post("/images", files=files, data={"patient_id": f"p{i // 3}"}).status_code == 201
    query = {"file": (phantom_images[4].name, phantom_images[4].read_bytes())}

    def top() -> tuple[int, int | None, float | None]:
        response = client.post("/search", files=query, data={"k": 1})
        if response.status_code == 503:
            assert response.headers.get("retry-after"), response.text
        matches = response.json().get("matches") if response.status_code == 200 else None
        if not matches:
            return response.status_code, None, None
        return response.status_code, matches[0]["image_id"], matches[0]["cosine"]

    nxt = Embedder.from_checkpoint(next_checkpoint)
    job_env = dict(
        os.environ,
        CXR_REID_DATABASE_URL=database_url,
        CXR_REID_BLOB_DIR=str(tmp_path / "blobs"),
        CXR_REID_DATA_DIR=str(tmp_path / "job"),
        CXR_REID_MODEL_PATH=str(next_checkpoint),
    )

    def reindex(*flags: str) -> None:
        command = [sys.executable, "-m", "app.cli", "reindex", "--no-progress", *flags]
        done = subprocess.run(command, env=job_env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr

    reindex("--stage-only")
    # staged only: the service serves the old network, unchanged
    assert service.model_id == old_model and top() == (200, 5, pytest.approx(1.0, abs=1e-4))
    answers: list[tuple[int, int | None, float | None]] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            answers.append(top())

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        time.sleep(0.3)
        reindex()  # the switch
        deadline = time.monotonic() + 30
        while service.model_id != nxt.model_id and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()

    assert service.model_id == nxt.model_id
    assert len(answers) >= 3
    served = [a for a in answers if a[0] == 200]
    assert {a[0] for a in answers} <= {200, 503} and len(served) >= 0.9 * len(answers), answers
    wrong = [a for a in served if a[1] != 5 or abs(a[2] - 1.0) >= 1e-4]
    assert not wrong, wrong
    # after the switch: the new network enrols and finds, the index holds the new vectors
    files = {"file": (phantom_images[9].name, phantom_images[9].read_bytes())}
    assert client.post("/images", files=files, data={"patient_id": "p3"}).status_code == 201
    assert top() == (200, 5, pytest.approx(1.0, abs=1e-4))
    assert service.gallery.is_consistent() and service.gallery.stored_model_id == nxt.model_id
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text


def test_a_writer_left_on_the_old_model_stores_nothing_after_the_switch(
    database_url: str, tmp_path: Path
) -> None:
    """A process that has not switched yet (its follower has not seen the swap) tries to add vectors
    of the old network: the database refuses them in the same transaction, nothing is stored."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    opts = {"database_url": database_url, "blob_dir": tmp_path / "blobs", "follow_poll_seconds": 60.0}
    old = Gallery(tmp_path / "old", dim=16, model_id="m1", **opts)
    try:
        old.add(x[:3], [NewImage(patient_id="a")] * 3)
        old._follower.stop()  # a process that has not noticed the switch yet
        new = Gallery(tmp_path / "new", dim=16, model_id="m2", allow_model_mismatch=True, **opts)
        try:
            assert new.reindex(lambda records: x[: len(records)] * 1.0, model_id="m2") == 3
        finally:
            new.close()
        with pytest.raises(ModelSwitchingError, match="switched to model 'm2'"):
            old.add(x[3:], [NewImage(patient_id="b")] * 3)
        assert len(old) == 3
    finally:
        old.close()
