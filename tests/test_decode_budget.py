"""Bounded memory under large images (issue 10, item 1): a global budget on decoded pixels, reserved
from the header before decoding, so concurrent large images wait their turn instead of piling up."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.server_process import Server, free_port, uvicorn_command
from app.service.decoding import DecodeBudget
from app.service.errors import BusyError, PayloadTooLargeError
from app.settings import MIB
from models.imaging.preprocess import DECODE_BYTES_PER_PIXEL, header_pixels

SIDE = 7000  # 49 M pixels: a 0.25 MB PNG that decodes to hundreds of MB


def _large_png() -> bytes:
    gradient = (np.add.outer(np.arange(SIDE), np.arange(SIDE) * 3) % 251).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, format="PNG")
    return buffer.getvalue()


def _memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


@pytest.mark.slow
def test_header_pixels_reads_only_the_header() -> None:
    data = _large_png()
    assert len(data) < 1_000_000 and header_pixels(data) == SIDE * SIDE
    assert header_pixels(b"not an image") is None


def test_budget_refuses_what_can_never_fit_and_times_out_when_full() -> None:
    budget = DecodeBudget(100 * MIB, wait_seconds=0.2)
    with (
        pytest.raises(PayloadTooLargeError, match="CXR_REID_MAX_DECODE_MB"),
        budget.reserve(101 * MIB, "'big.png'"),
    ):
        pass
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with budget.reserve(80 * MIB, "'a.png'"):
            held.set()
            release.wait(5)

    worker = threading.Thread(target=hold)
    worker.start()
    held.wait(5)
    started = time.monotonic()
    with pytest.raises(BusyError) as caught, budget.reserve(30 * MIB, "'b.png'"):
        pass
    assert time.monotonic() - started >= 0.2 and caught.value.retry_after == 1
    release.set()
    worker.join()
    with budget.reserve(30 * MIB, "'b.png'"):  # room again
        assert budget.in_use == 30 * MIB
    assert budget.in_use == 0 and budget.peak == 80 * MIB


def test_the_api_answers_413_and_503_with_retry_after(
    make_client, phantom_images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    client = make_client(max_decode_mb=1)
    big = io.BytesIO()
    Image.fromarray((np.add.outer(np.arange(600), np.arange(600)) % 251).astype(np.uint8)).save(
        big, format="PNG"
    )
    too_big = client.post("/embed", files={"file": ("big.png", big.getvalue())})
    assert too_big.status_code == 413 and "CXR_REID_MAX_DECODE_MB" in too_big.json()["detail"]
    service = client.app.state.service

    def busy(*args: object) -> None:
        raise BusyError("too many large images are being decoded right now; try again shortly", retry_after=7)

    monkeypatch.setattr(service, "embed_uploads", busy)
    answer = client.post("/embed", files={"file": ("a.png", phantom_images[0].read_bytes())})
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "7"


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc")
def test_concurrent_large_images_stay_under_the_budget(
    server_env: dict[str, str], servers: list[Server], tmp_path: Path
) -> None:
    budget_mib = 700  # room for one 7000 x 7000 image at a time (49 M px x 12 B = 561 MiB)
    env = {**server_env, "CXR_REID_MAX_DECODE_MB": str(budget_mib), "CXR_REID_DECODE_WAIT_SECONDS": "120"}
    port = free_port()
    server = Server(uvicorn_command(port), env, port, tmp_path / "server.log")
    servers.append(server)
    assert header_pixels(data := _large_png()) * DECODE_BYTES_PER_PIXEL < budget_mib * MIB
    before = _memory_kib(server.process.pid)

    def embed(i: int) -> int:
        files = {"file": (f"{i}.png", data)}
        return httpx.post(f"{server.url}/embed", files=files, timeout=300).status_code

    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = list(pool.map(embed, range(6)))
    assert statuses == [200] * 6
    growth_mib = (_memory_kib(server.process.pid)["VmHWM"] - before["VmRSS"]) / 1024
    # unbudgeted, six concurrent decodes take about 6 x 300 MiB; budgeted, one at a time
    assert growth_mib < budget_mib, f"peak RSS grew by {growth_mib:.0f} MiB"
