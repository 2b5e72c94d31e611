"""The README's and the guides' commands run as written.

A fenced ```bash block preceded by ``<!-- runs-as-written -->`` is run, in the order of its page,
in one bash (``set -euo pipefail``: every command must succeed, and variables such as ``$CXR``
carry from block to block) against a real uvicorn server of the shipped model on a free port, from
a folder holding a copy of the repository's examples/ and scripts/; a marked ```python block runs
there too, through the environment's python with ``$CXR`` set. The page defines where the service
is once (``CXR=...``, and ``PACS=...`` / ``DICOM_HOST=... DICOM_PORT=...`` where it talks to a
PACS); the test puts its own addresses there and nowhere else, so a command that names port 8000
itself fails. ``<!-- runs-as-written: pacs -->`` blocks need a real Orthanc (skipped, with the rest
of the page still run, where Debian's orthanc is missing); ``<!-- runs-as-written: exit N -->``
blocks stand alone and must exit N (``cxr-reid audit`` exits 1 on findings).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.server_process import ROOT, Server, free_port, server_env, uvicorn_command
from tests.orthanc import Orthanc, missing_reason

MARK = re.compile(
    r"<!-- runs-as-written(?::\s*(?P<tags>[^>]*?))?\s*-->\s*\n```(?P<lang>bash|python)\n(?P<body>.*?)\n```",
    re.S,
)
#: the lines that say where the service (and the PACS) is: the only place an address may be written
ADDRESS_LINES = {
    "CXR": re.compile(r"^CXR=\S+", re.M),
    "PACS": re.compile(r"^PACS=\S+", re.M),
    "DICOM": re.compile(r"^DICOM_HOST=\S+ DICOM_PORT=\S+", re.M),
}
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


@dataclass
class Block:
    page: str
    line: int
    body: str
    pacs: bool
    exit_code: int


def blocks(page: str) -> list[Block]:
    text = (ROOT / page).read_text()
    found = []
    for match in MARK.finditer(text):
        tags = [t.strip() for t in (match.group("tags") or "").split(",") if t.strip()]
        code = next((int(t.split()[1]) for t in tags if t.startswith("exit")), 0)
        line = text.count("\n", 0, match.start()) + 1
        body = match.group("body")
        if match.group("lang") == "python":  # run by the environment's python, with $CXR in its environment
            body = f"CXR=\"$CXR\" python - <<'PYTHON'\n{body}\nPYTHON"
        found.append(Block(page, line, body, "pacs" in tags, code))
    return found


def runnable_pages() -> list[object]:
    params = []
    for page in PAGES:
        found = blocks(page)
        if not found:
            continue
        marks = [pytest.mark.server, pytest.mark.slow]
        if any(b.pacs for b in found):
            marks.append(pytest.mark.pacs)
        params.append(pytest.param(page, marks=marks, id=page))
    return params


def test_the_guides_mark_what_the_readme_promises() -> None:
    """The README's and each persona guide's first commands are marked, so this file runs them."""
    for page in ("README.md", "docs/pacs.md", "docs/research.md", "docs/privacy.md"):
        assert blocks(page), f"{page} has no <!-- runs-as-written --> block"
    pacs = blocks("docs/pacs.md")
    assert any(b.pacs for b in pacs), "docs/pacs.md runs its Orthanc commands"
    stow = "\n".join(b.body for b in pacs)
    assert "examples/dicom/" in stow and "dicomweb/studies" in stow and "cxr-reid sync" in stow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder like the repository root, holding copies of what the commands read."""
    work = tmp_path_factory.mktemp("docs-commands")
    for name in ("examples", "scripts"):
        shutil.copytree(ROOT / name, work / name)
    return work


@dataclass
class Service:
    url: str
    dicom_port: int


@pytest.fixture(scope="module")
def server(workdir: Path) -> Iterator[Service]:
    """The shipped model served on free ports (HTTP, and DICOM C-STORE), its gallery in ``workdir``."""
    dicom_port = free_port()
    env = server_env(
        workdir / "served-data", None, CXR_REID_TORCH_THREADS="1", CXR_REID_DICOM_PORT=str(dicom_port)
    )
    port = free_port()
    served = Server(uvicorn_command(port), env, port, workdir / "server.log")
    yield Service(served.url, dicom_port)
    served.stop()


def _script(page_blocks: list[Block], addresses: dict[str, str]) -> str:
    parts = ["set -euo pipefail"]
    for block in page_blocks:
        body = block.body
        for name, pattern in ADDRESS_LINES.items():
            if name in addresses:
                body = pattern.sub(lambda _m, name=name: addresses[name], body)
        assert "127.0.0.1:8000" not in body and "localhost:8000" not in body, (
            f"{block.page}:{block.line} names port 8000 outside the one line that says where the service is"
        )
        parts.append(f"echo '>>> {block.page}:{block.line}' >&2\n{body}")
    return "\n".join(parts) + "\n"


def _run(script: str, workdir: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_REID_")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["CXR_REID_TORCH_THREADS"] = "1"
    return subprocess.run(
        ["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.skipif(
    shutil.which("jq") is None or shutil.which("curl") is None, reason="the guides' commands use curl and jq"
)
@pytest.mark.parametrize("page", runnable_pages())
def test_commands_run_as_written(page: str, server: Service, workdir: Path, tmp_path: Path) -> None:
    found = blocks(page)
    addresses = {
        "CXR": f"CXR={server.url}",
        "DICOM": f"DICOM_HOST=127.0.0.1 DICOM_PORT={server.dicom_port}",
    }
    orthanc = None
    if any(b.pacs for b in found):
        if missing_reason() is None:
            orthanc = Orthanc(
                tmp_path / "orthanc", dicomweb_servers={"cxr-reid": {"Url": f"{server.url}/dicomweb/"}}
            )
            addresses["PACS"] = f"PACS={orthanc.url}"
        else:
            found = [b for b in found if not b.pacs]
    try:
        chained = [b for b in found if b.exit_code == 0]
        if chained:
            done = _run(_script(chained, addresses), workdir)
            assert done.returncode == 0, (
                f"{page} (exit {done.returncode}):\n{done.stderr[-4000:]}\n{done.stdout[-2000:]}"
            )
        for block in (b for b in found if b.exit_code != 0):
            done = _run(_script([block], addresses), workdir)
            assert done.returncode == block.exit_code, (
                f"{page}:{block.line} exited {done.returncode}, the page says {block.exit_code}:\n"
                f"{done.stderr[-4000:]}"
            )
    finally:
        if orthanc is not None:
            orthanc.stop()


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_between_the_pages_lead_somewhere() -> None:
    broken = []
    for page in PAGES:
        path = ROOT / page
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{page}: {target}")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{page}: {target} (no such heading)")
    assert not broken, broken
