"""The install step of the README's two commands asks for the CPU build of torch, whatever pip's
configuration says.

`scripts/_venv.sh` is run as is, with a stand-in for the virtual environment's python that turns its
one `pip install` into `pip install --isolated --dry-run --report` (``--isolated`` ignores pip's
configuration files and ``PIP_*`` variables), and the report of what pip would install is checked.
Where PyTorch's CPU index cannot be reached (this sandbox), a local folder holding the same CPU wheel
stands in for it; PyPI must be reachable for the other packages.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import urllib.parse
import urllib.request
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


def test_cuda_variant_asks_pytorchs_index_for_that_build(tmp_path: Path) -> None:
    """TORCH_VARIANT=cu128 asks for torch==<version>+cu128 from PyTorch's cu128 index, then the
    package with the same pin and no other index."""
    _shim_venv(tmp_path / "venv", "printf '%s\\n'")
    env = dict(os.environ, VENV=str(tmp_path / "venv"), EXTRAS="test", TORCH_VARIANT="cu128")
    printed = _run_venv_script(env).stdout.split("\n")
    second = printed.index("2")
    first, then = printed[1:second], printed[second + 1 : -1]
    pin = f"torch=={_torch_version()}+cu128"
    assert (
        pin in first
        and first[first.index("--extra-index-url") + 1] == "https://download.pytorch.org/whl/cu128"
    )
    assert pin in then and then[-2:] == ["-e", ".[test]"] and "--extra-index-url" not in then
