"""The install step of the README's two commands asks for the CPU build of torch, whatever pip's
configuration says.

`scripts/_venv.sh` is run as is, with a stand-in for the virtual environment's python that turns its
one `pip install` into `pip install --isolated --dry-run --report` (``--isolated`` ignores pip's
configuration files and ``PIP_*`` variables), and the report of what pip would install is checked.
Where PyTorch's CPU index cannot be reached (this sandbox), a local folder holding the same CPU wheel
stands in for it; PyPI must be reachable for the other packages.
"""

from __future__ import annotations

import http.server
import json
import os
import shlex
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.install
ROOT = Path(__file__).resolve().parents[1]
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_PACKAGE_PREFIXES = ("nvidia-", "triton", "cuda-")


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10):
            return True
    except OSError:
        return False


def _torch_version() -> str:
    text = (ROOT / "scripts" / "_venv.sh").read_text()
    line = next(line for line in text.splitlines() if line.startswith("TORCH_VERSION="))
    return line.split("=", 1)[1].strip()


def _local_cpu_wheel(version: str) -> Path | None:
    """A CPU torch wheel in one of pip's configured find-links folders, to stand in for the index."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    folders = [value for key, value in os.environ.items() if key == "PIP_FIND_LINKS"]
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            folders.append(value.strip("'\""))
    for folder in " ".join(folders).split():
        hits = sorted(Path(folder.removeprefix("file://")).glob(f"torch-{version}+cpu-*.whl"))
        if hits:
            return hits[0]
    return None


def _shim_venv(venv: Path, then: str) -> None:
    """A venv whose python, asked to `-m pip install ARGS` for the Nth time, runs ``then N ARGS``."""
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(
        "#!/bin/bash\n"
        '[ "$1 $2 $3" = "-m pip install" ] || { echo "unexpected call: $*" >&2; exit 3; }\n'
        "shift 3\n"
        f'echo x >> "{venv}/calls"; n=$(wc -l < "{venv}/calls")\n'
        f'exec {then} "$n" "$@"\n'
    )
    python.chmod(python.stat().st_mode | stat.S_IXUSR)


def _run_venv_script(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["bash", "-c", ". scripts/_venv.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _installs(report: Path) -> dict[str, dict[str, Any]]:
    return {item["metadata"]["name"].lower(): item for item in json.loads(report.read_text())["install"]}


@pytest.mark.slow
def test_install_commands_resolve_the_cpu_torch_build_with_pip_config_ignored(tmp_path: Path) -> None:
    if not _reachable("https://pypi.org/simple/"):
        pytest.skip("PyPI is unreachable: nothing to resolve the other packages against")
    version = _torch_version()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env.update(VENV=str(tmp_path / "venv"), EXTRAS="test", PIP_CONFIG_FILE=os.devnull)
    index = TORCH_CPU_INDEX
    if not _reachable(f"{TORCH_CPU_INDEX}/torch/"):
        wheel = _local_cpu_wheel(version)
        if wheel is None:
            pytest.skip("PyTorch's CPU index is unreachable and no local CPU wheel stands in for it")
        project = tmp_path / "index" / "torch"
        project.mkdir(parents=True)
        (project / "index.html").write_text(f'<a href="{wheel.as_uri()}">{wheel.name}</a>')
        index = env["TORCH_INDEX"] = (tmp_path / "index").as_uri()
    # Call 1 (torch) runs as written. Call 2 (the package, with the same pin) relies on call 1 having
    # installed torch; a dry run installs nothing, so it may look torch up where call 1 found it.
    pip = f"{shlex.quote(sys.executable)} -m pip install --isolated --dry-run --ignore-installed"
    reports = shlex.quote(str(tmp_path / "report"))
    shim = (
        f'bash -c \'n=$1; shift; [ "$n" = 1 ] || set -- "$@" --extra-index-url {shlex.quote(index)}; '
        f'exec {pip} --report {reports}-$n.json "$@"\' shim'
    )
    _shim_venv(tmp_path / "venv", shim)

    _run_venv_script(env)

    for call in (1, 2):
        installs = _installs(tmp_path / f"report-{call}.json")
        torch = installs["torch"]
        assert torch["metadata"]["version"] == f"{version}+cpu", call
        assert f"{version}+cpu" in urllib.parse.unquote(torch["download_info"]["url"].rsplit("/", 1)[-1])
        cuda = sorted(name for name in installs if name.startswith(CUDA_PACKAGE_PREFIXES))
        assert not cuda, f"pip call {call} would pull CUDA packages: {cuda}"
    assert "cxr-reid" in _installs(tmp_path / "report-2.json")


def test_without_pytorchs_index_the_install_fails_instead_of_taking_pypis_cuda_build(tmp_path: Path) -> None:
    """The pin is what protects: with PyTorch's index unreachable, pip would otherwise fall back to
    PyPI's torch, the CUDA build, without a word."""
    if not _reachable("https://pypi.org/simple/"):
        pytest.skip("PyPI is unreachable")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env.update(
        VENV=str(tmp_path / "venv"),
        EXTRAS="test",
        PIP_CONFIG_FILE=os.devnull,
        TORCH_INDEX=(tmp_path / "unreachable").as_uri(),
    )
    pip = f"{shlex.quote(sys.executable)} -m pip install --isolated --dry-run --ignore-installed"
    _shim_venv(tmp_path / "venv", f"bash -c 'shift; exec {pip} \"$@\"' shim")
    done = subprocess.run(
        ["bash", "-c", "set -e; . scripts/_venv.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0
    assert f"No matching distribution found for torch=={_torch_version()}+cpu" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("_venv.sh: nothing pip can reach serves")


def _closed_loopback_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def answering_index() -> Iterator[str]:
    """A loopback HTTP server that answers every request with an empty 200: an index that is up."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/whl"
    finally:
        server.shutdown()
        server.server_close()


def _fake_torch_wheel(folder: Path, version: str) -> Path:
    """A wheel that says it is torch <version>+cpu (metadata only): what pip resolves a pin against."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"torch-{version}+cpu-py3-none-any.whl"
    info = f"torch-{version}+cpu.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}+cpu\n")
        z.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{info}/RECORD", "")
    return wheel


def _offline_pip(venv: Path, find_links: Path) -> str:
    """The shim's command: call 1 (torch) is a real `pip install --dry-run` with pip's configuration
    ignored, no index but an empty local one and ``find_links`` standing in for "what pip finds
    locally"; an index `_venv.sh` adds would still be asked (and retried). Call 2 is recorded only."""
    empty_index = venv.parent / "empty-index"
    (empty_index / "torch").mkdir(parents=True, exist_ok=True)
    (empty_index / "torch" / "index.html").write_text("<html></html>")
    pip = (
        f"{shlex.quote(sys.executable)} -m pip install --isolated --dry-run --ignore-installed --no-deps "
        f"--index-url {shlex.quote(empty_index.as_uri())} --find-links {shlex.quote(str(find_links))} "
        f"--report {shlex.quote(str(venv / 'report.json'))}"
    )
    return f'bash -c \'n=$1; shift; [ "$n" = 1 ] || exit 0; exec {pip} "$@"\' shim'


def _run_sourced(env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    """Source `_venv.sh` as scripts/serve.sh does, with pip's configuration files and variables off."""
    env = {key: value for key, value in env.items() if not key.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    started = time.monotonic()
    done = subprocess.run(
        ["bash", "-c", "set -euo pipefail; . scripts/_venv.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done, time.monotonic() - started


def test_an_unreachable_index_is_said_in_one_line_and_the_local_wheel_used_without_retries(
    tmp_path: Path,
) -> None:
    """An index that does not answer is probed once and left out: one line says so, pip never asks
    it (no "Retrying"), and the pinned build comes from what pip finds without it."""
    version = _torch_version()
    venv, wheels = tmp_path / "venv", tmp_path / "wheels"
    _fake_torch_wheel(wheels, version)
    _shim_venv(venv, _offline_pip(venv, wheels))
    index = f"http://127.0.0.1:{_closed_loopback_port()}/whl/cpu"
    env = dict(os.environ, VENV=str(venv), EXTRAS="test", TORCH_INDEX=index)

    done, seconds = _run_sourced(env)

    assert done.returncode == 0, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(said) == 1 and said[0].startswith(f"_venv.sh: {index} did not answer"), said
    assert "Retrying" not in done.stderr
    assert seconds < 30, f"the install took {seconds:.0f} s: the index was retried"
    torch = _installs(venv / "report.json")["torch"]
    assert torch["metadata"]["version"] == f"{version}+cpu"
    assert torch["download_info"]["url"].startswith(wheels.as_uri())


def test_when_nothing_serves_the_pinned_build_the_install_names_the_one_command_to_fix_it(
    tmp_path: Path,
) -> None:
    venv = tmp_path / "venv"
    _shim_venv(venv, _offline_pip(venv, tmp_path / "no-wheels"))
    (tmp_path / "no-wheels").mkdir()
    env = dict(
        os.environ,
        VENV=str(venv),
        EXTRAS="test",
        TORCH_INDEX=f"http://127.0.0.1:{_closed_loopback_port()}/whl/cpu",
    )
    env.pop("TORCH_FIX", None)

    done, seconds = _run_sourced(env)

    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    pin = f"torch=={_torch_version()}+cpu"
    assert last == (
        f"_venv.sh: nothing pip can reach serves {pin}; fix: TORCH_INDEX=<a wheel index URL, or a folder "
        f"holding torch-{_torch_version()}+cpu-*.whl> bash bash"
    ), last
    assert "Retrying" not in done.stderr and seconds < 30
    assert not (venv / "calls").read_text().count("\n") > 1, "the package was installed without torch"


def test_a_folder_or_wheel_given_as_torch_index_is_used_as_find_links(tmp_path: Path) -> None:
    """The fix the failure names works: TORCH_INDEX may be a folder (or one .whl) holding the wheel."""
    version = _torch_version()
    wheel = _fake_torch_wheel(tmp_path / "downloads", version)
    for given in (wheel.parent, wheel):
        venv = tmp_path / f"venv-{given.name}"
        _shim_venv(venv, _offline_pip(venv, tmp_path / "nothing-else"))
        (tmp_path / "nothing-else").mkdir(exist_ok=True)
        env = dict(os.environ, VENV=str(venv), EXTRAS="test", TORCH_INDEX=str(given))

        done, _ = _run_sourced(env)

        assert done.returncode == 0, done.stderr[-3000:]
        assert _installs(venv / "report.json")["torch"]["download_info"]["url"] == wheel.as_uri()


def test_cuda_variant_asks_that_index_for_that_build(tmp_path: Path, answering_index: str) -> None:
    """TORCH_VARIANT=cu128 asks for torch==<version>+cu128 from the index (when it answers), then the
    package with the same pin and no other index."""
    _shim_venv(tmp_path / "venv", "printf '%s\\n'")
    env = dict(
        os.environ,
        VENV=str(tmp_path / "venv"),
        EXTRAS="test",
        TORCH_VARIANT="cu128",
        TORCH_INDEX=answering_index,
    )
    printed = _run_venv_script(env).stdout.split("\n")
    second = printed.index("2")
    first, then = printed[1:second], printed[second + 1 : -1]
    pin = f"torch=={_torch_version()}+cu128"
    assert pin in first and first[first.index("--extra-index-url") + 1] == answering_index
    assert pin in then and then[-2:] == ["-e", ".[test]"] and "--extra-index-url" not in then


def test_the_default_index_is_pytorchs_for_the_variant(tmp_path: Path) -> None:
    """Without TORCH_INDEX the index is PyTorch's for the variant: handed to pip when it answers,
    named in the one line when it does not."""
    _shim_venv(tmp_path / "venv", "printf '%s\\n'")
    env = dict(os.environ, VENV=str(tmp_path / "venv"), EXTRAS="test", TORCH_VARIANT="cu128")
    env.pop("TORCH_INDEX", None)
    done = _run_venv_script(env)
    url = "https://download.pytorch.org/whl/cu128"
    printed = done.stdout.split("\n")
    first = printed[1 : printed.index("2")]
    if "--extra-index-url" in first:
        assert first[first.index("--extra-index-url") + 1] == url
    else:
        assert done.stderr.startswith(f"_venv.sh: {url} did not answer"), done.stderr
