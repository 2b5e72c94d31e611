"""`scripts/demo.sh`, the walk-through of docs/pacs.md on real radiographs, against the shipped model."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from app.server_process import ROOT, Server, free_port, server_env, uvicorn_command

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(shutil.which("jq") is None, reason="the demo needs jq (scripts/test.sh installs it)"),
]


def _demo(url: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "scripts/demo.sh", url], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_demo_passes_against_the_shipped_model_any_number_of_times(
    servers: list[Server], tmp_path: Path
) -> None:
    env = server_env(tmp_path / "data", None, CXR_REID_TORCH_THREADS="1", CXR_REID_API_KEYS="demo-key")
    port = free_port()
    server = Server(uvicorn_command(port), env, port, tmp_path / "server.log")
    servers.append(server)
    env["CXR_REID_API_KEY"] = "demo-key"
    for _ in range(2):  # a second run enrols into a fresh collection of the same gallery
        done = _demo(server.url, env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "wrong-patient alert: it matches child A" in done.stdout
        assert "every answer was as docs/pacs.md says" in done.stdout


def test_demo_fails_loudly_when_an_answer_is_not_what_the_readme_says(
    servers: list[Server], tmp_path: Path
) -> None:
    # a threshold below every score: every pair is "the same patient", so enrolling B raises an alert
    env = server_env(tmp_path / "data", None, CXR_REID_TORCH_THREADS="1", CXR_REID_THRESHOLD="-1")
    port = free_port()
    servers.append(Server(uvicorn_command(port), env, port, tmp_path / "server.log"))
    done = _demo(f"http://127.0.0.1:{port}", env)
    assert done.returncode == 1
    assert "demo: unexpected answer: child B's two images enrolled without an alert" in done.stderr

    nothing = _demo(f"http://127.0.0.1:{free_port()}", env)
    assert nothing.returncode == 1 and "is the server running at" in nothing.stderr
