"""Micro-batching (issue 11): concurrent requests share forward passes, and get exactly their own rows."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from app.service.batcher import MicroBatcher
from models.imaging.preprocess import prepare
from models.net.embedder import Embedder


def test_concurrent_requests_share_forward_passes_and_get_their_own_rows(embedder: Embedder) -> None:
    rng = np.random.default_rng(0)
    config = embedder.preprocess_config
    images = [prepare(rng.random((96, 80)).astype(np.float32), config) for _ in range(24)]
    alone = np.stack([embedder.embed_prepared(image[None])[0] for image in images])
    batcher = MicroBatcher(embedder.embed_prepared, max_batch=16, wait_ms=50)
    start = threading.Barrier(8)

    def request(i: int) -> np.ndarray:
        start.wait()
        return batcher.embed(images[3 * i : 3 * i + 3])

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(request, range(8)))
    batcher.close()
    np.testing.assert_allclose(np.concatenate(answers), alone, atol=1e-5)  # each got its own rows
    assert max(batcher.batch_sizes) > 3  # images of several requests went through one pass
    assert sum(size * n for size, n in batcher.batch_sizes.items()) == 24


def test_a_lone_request_does_not_wait_for_company() -> None:
    """Alone (the last pass held one request's images) a request goes straight through: with a
    wait of 60 s configured, it still returns at once."""
    batcher = MicroBatcher(lambda batch: batch.reshape(len(batch), -1)[:, :2], max_batch=16, wait_ms=60_000)
    for _ in range(3):
        done = threading.Event()
        threading.Thread(
            target=lambda done=done: (batcher.embed([np.ones((4, 4), np.float32)] * 2), done.set())
        ).start()
        assert done.wait(timeout=30), "a lone request waited for the batching window"
    batcher.close()
    assert batcher.batch_sizes == {2: 3}


def test_a_failed_pass_fails_its_requests_and_the_batcher_goes_on() -> None:
    calls = []

    def embed(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return batch.reshape(len(batch), -1)[:, :4]

    batcher = MicroBatcher(embed, wait_ms=1)
    with pytest.raises(RuntimeError, match="out of memory"):
        batcher.embed([np.zeros((8, 8), np.float32)])
    assert batcher.embed([np.ones((8, 8), np.float32)]).shape == (1, 4)
    batcher.close()


def test_the_service_embeds_through_the_batcher(make_client, phantom_images) -> None:  # noqa: ANN001
    client = make_client()
    files = [("files", (p.name, p.read_bytes())) for p in phantom_images[:5]]
    assert client.post("/embed", files=files).status_code == 200
    assert sum(client.app.state.service._batcher.batch_sizes.values()) >= 1
