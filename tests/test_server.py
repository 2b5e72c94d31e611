"""The real server as a subprocess, over real HTTP: durability across kill -9, streaming limits, load."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from app.server_process import ROOT, Server, free_port, uvicorn_command

pytestmark = pytest.mark.server


@pytest.mark.slow
def test_acknowledged_enrolments_survive_kill_9(
    server_env: dict[str, str], servers: list[Server], tmp_path: Path, phantom_images: list[Path]
) -> None:
    port = free_port()
    first = Server(uvicorn_command(port), server_env, port, tmp_path / "server.log")
    servers.append(first)
    acknowledged = []
    with httpx.Client(base_url=first.url, timeout=30) as http:
        for i, path in enumerate(phantom_images[:4]):
            response = http.post(
                "/images", files={"file": (path.name, path.read_bytes())}, data={"patient_id": f"p{i // 3}"}
            )
            assert response.status_code == 201, response.text
            acknowledged.append(response.json()["images"][0]["image_id"])
        assert http.delete(f"/images/{acknowledged[1]}").status_code == 200
    first.stop(signal.SIGKILL)
    assert first.process.returncode == -signal.SIGKILL

    # restart through the CLI this time: `cxr-reid serve`
    port = free_port()
    command = [sys.executable, "-m", "app.cli", "serve", "--port", str(port)]
    second = Server(command, server_env, port, tmp_path / "server.log")
    servers.append(second)
    with httpx.Client(base_url=second.url, timeout=30) as http:
        listing = http.get("/images").json()
        expected = [acknowledged[0], *acknowledged[2:]]
        assert [item["image_id"] for item in listing["items"]] == expected
        query = phantom_images[2]
        hits = http.post("/search", files={"file": (query.name, query.read_bytes())}).json()["matches"]
        assert hits[0]["image_id"] == acknowledged[2] and hits[0]["score"] == pytest.approx(1.0, abs=1e-6)
        assert http.get("/readyz").json()["gallery_images"] == 3
    _assert_healthcheck_and_lock_retry(second, server_env, tmp_path)  # stops `second` on the way
    second.stop()
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells how it ended
    assert second.process.returncode in (0, -signal.SIGTERM)
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log
    # quiet start-up: faiss's loader does not report the builds it failed to find; we name the one loaded
    assert "ModuleNotFoundError" not in log
    assert "; faiss 1." in log


def _healthcheck(port: int, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "app.cli", "healthcheck", "--port", str(port), "--timeout", "10"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def _assert_healthcheck_and_lock_retry(ready: Server, env: dict[str, str], tmp_path: Path) -> None:
    """The container HEALTHCHECK: healthy only when ready; no server, or a second server finding the
    gallery locked, is unhealthy, and that second server becomes ready once the first one stops."""
    assert _healthcheck(ready.port, env).returncode == 0
    nothing = _healthcheck(free_port(), env)
    assert nothing.returncode == 1 and "did not answer" in nothing.stderr
    port = free_port()
    env = {**env, "CXR_REID_LOCK_RETRY_SECONDS": "0.5"}
    second = subprocess.Popen(
        uvicorn_command(port), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while "did not answer" in (answer := _healthcheck(port, env)).stderr and time.monotonic() < deadline:
            time.sleep(0.5)
        assert answer.returncode == 1 and "answered 503" in answer.stderr, answer.stderr
        assert "as soon as the other process lets go" in answer.stderr
        ready.stop()
        deadline = time.monotonic() + 30
        while (answer := _healthcheck(port, env)).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert answer.returncode == 0, answer.stderr
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").json()["gallery_images"] == 3
    finally:
        second.kill()
        second.wait()


def _multipart(field: str, filename: str, payload: bytes, boundary: str) -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )


@pytest.mark.slow
def test_limits_and_concurrency_over_real_http(
    server_env: dict[str, str], servers: list[Server], tmp_path: Path, phantom_images: list[Path]
) -> None:
    limit = 300_000
    port = free_port()
    env = {**server_env, "CXR_REID_MAX_UPLOAD_BYTES": str(limit), "CXR_REID_API_KEYS": "k1"}
    server = Server(uvicorn_command(port), env, port, tmp_path / "server.log")
    servers.append(server)
    headers = {"X-API-Key": "k1"}
    body = _multipart("file", "huge.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * (3 * limit), "b0undary")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while streaming
        for start in range(0, len(body), 16_384):
            yield body[start : start + 16_384]

    with httpx.Client(base_url=server.url, timeout=30, headers=headers) as http:
        streamed = http.post(
            "/images", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b0undary"}
        )
        assert streamed.status_code == 413 and "limit" in streamed.json()["detail"]
        declared = http.post("/embed", files={"file": ("huge.png", body)})
        assert declared.status_code == 413

        uploads = [p.read_bytes() for p in phantom_images[:6]]

        def work(i: int) -> int:
            data = uploads[i % len(uploads)]
            if i % 2:
                return http.post("/embed", files={"file": (f"{i}.png", data)}).status_code
            return http.post(
                "/images", files={"file": (f"{i}.png", data)}, data={"patient_id": f"p{i}"}
            ).status_code

        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = list(pool.map(work, range(16)))
        assert sorted(set(statuses)) == [200, 201]
        assert http.get("/images").json()["total"] == 8
        assert http.get("/readyz").status_code == 200
        assert http.get("/metrics", headers={"X-API-Key": ""}).status_code == 401
        assert http.get("/metrics").status_code == 200  # the client's default header holds the key
    server.stop()
