"""The command line as a new user meets it: --version, help on every option, the same --out rule for
the reports, `models` starting from the shipped network, a damaged --model refused like a missing
one, and Ctrl-C during `enroll` saying what was kept and how to resume."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.cli import build_parser, main
from app.cli.analysis import DEFAULT_OUT
from models.net.checkpoint import load_checkpoint
from models.net.embedder import DEFAULT_CHECKPOINT

CLI = [sys.executable, "-m", "app.cli"]


def _parsers(
    parser: argparse.ArgumentParser, path: str = "cxr-reid"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser of the command tree with its command line, the top one first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_option_has_help_and_help_renders_cleanly() -> None:
    missing, percent = [], []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{path} {c.dest}" for c in action._choices_actions if not c.help]
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
        if "%%" in parser.format_help() or "%(" in parser.format_help():
            percent.append(path)
    assert not missing, f"options without help: {missing}"
    assert not percent, f"unformatted % in the help of: {percent}"


def test_version_names_the_package_and_the_shipped_model(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0
    shipped = load_checkpoint(DEFAULT_CHECKPOINT)["model_id"]
    assert capsys.readouterr().out.strip() == f"cxr-reid {version('cxr-reid')}, shipped model {shipped}"


def test_audit_and_risk_share_one_out_rule(capsys: pytest.CaptureFixture[str]) -> None:
    """Both reports: --out optional, default ./cxr-reid-<command>, and the help says so."""
    parser = build_parser()
    audit = parser.parse_args(["audit", "set.csv"])
    risk = parser.parse_args(["risk", "release.csv", "--reference", "ref.csv"])
    assert (
        (audit.out, risk.out)
        == (DEFAULT_OUT["audit"], DEFAULT_OUT["risk"])
        == ("cxr-reid-audit", "cxr-reid-risk")
    )
    for command in ("audit", "risk"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert f"(default ./cxr-reid-{command})" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow  # builds every variant on the meta device: about 6 s on two cores
def test_models_starts_from_the_shipped_network(capsys: pytest.CaptureFixture[str]) -> None:
    """No flags: the width, input and embedding size of the shipped checkpoint, which MODEL_CARD.md
    describes (the card's network line names the same width)."""
    shipped = load_checkpoint(DEFAULT_CHECKPOINT)
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {row["width"] for row in rows} == {shipped["backbone"]["width"]}
    assert {row["input_size"] for row in rows} == {shipped["preprocess"]["size"]}
    assert {row["embedding_dim"] for row in rows} == {shipped["backbone"]["embedding_dim"]}
    card = (Path(__file__).resolve().parents[1] / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert f"width {shipped['backbone']['width']}:" in card


@pytest.mark.server  # the CLI in a subprocess
@pytest.mark.parametrize("command", ["serve", "enroll", "audit"])
def test_a_damaged_model_is_one_line_and_exit_2_like_a_missing_one(tmp_path: Path, command: str) -> None:
    shipped = DEFAULT_CHECKPOINT.read_bytes()
    damaged = {
        "truncated.pt": shipped[: len(shipped) // 3],
        "text.pt": b"hello\n",
    }
    images = tmp_path / "images"
    images.mkdir()
    # something to enrol or audit: the model is loaded after the images are found
    Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)).save(images / "x.png")
    where = {
        "serve": ["--data-dir", str(tmp_path / "data")],
        "enroll": [str(images), "--data-dir", str(tmp_path / "data")],
        "audit": [str(images), "--out", str(tmp_path / "audit")],
    }[command]
    cases = (
        {**damaged, "missing.pt": None} if command == "serve" else {"truncated.pt": damaged["truncated.pt"]}
    )
    for name, data in cases.items():
        model = tmp_path / name
        if data is not None:
            model.write_bytes(data)
        done = subprocess.run(
            [*CLI, command, *where, "--model", str(model)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
        assert done.returncode == 2, (name, done.stderr[-3000:])
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        assert len(errors) == 1 and len(done.stderr.splitlines()) <= 2, done.stderr
        assert name in errors[0]
        expected = "not found" if data is None else "is not a cxr-reid checkpoint"
        assert expected in errors[0] and "weights_only" not in errors[0]


def _rows(data_dir: Path) -> int:
    db = data_dir / "gallery.sqlite"
    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=5) as conn:
            return int(conn.execute("SELECT count(*) FROM images").fetchone()[0])
    except sqlite3.OperationalError:  # created but no table yet
        return 0


@pytest.mark.server  # the CLI in a subprocess, stopped by SIGINT
def test_ctrl_c_during_enroll_says_what_was_kept_and_how_to_resume(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from models.imaging.phantom import write_phantom_set

    manifest = write_phantom_set(tmp_path / "set", 30, 2, size=64, fmt="png", seed=3)
    data = tmp_path / "data"
    command = [
        *CLI, "enroll", str(manifest), "--collection", "ward 7", "--batch-size", "1",
        "--data-dir", str(data), "--model", str(tiny_checkpoint), "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "CXR_REID_TORCH_THREADS": "1"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while _rows(data) < 2:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline, "enroll did not start enrolling"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    kept = int(re.search(r"interrupted: (\d+) image\(s\) enrolled and kept in collection 'ward 7'", last)[1])
    assert 2 <= kept < 60 and kept == _rows(data)
    resume = last.split("to resume: ", 1)[1]
    assert shlex.split(resume)[0] == "cxr-reid" and shlex.split(resume)[1:] == command[3:]
    # the command it names resumes: the rest goes in, nothing twice
    done = subprocess.run(
        [*CLI, *shlex.split(resume)[1:]], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"skipped {kept} already in collection" in done.stderr and _rows(data) == 60


def test_help_does_not_import_torch() -> None:
    """``cxr-reid --help`` (and every subcommand's parser) answers without importing torch: reading the
    options should not cost a second of imports."""
    code = (
        "import sys\n"
        "from app.cli import main\n"
        "for argv in (['--help'], ['evaluate', '--help'], ['data', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stderr.strip().splitlines()[-1] == "False", done.stderr
