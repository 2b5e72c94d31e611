"""The `cxr-reid` command line: model listing, evaluation JSON, phantom sets, clear failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import main
from models.evaluation.metrics import HEADLINE_METRICS

REQUIRED_KEYS = {*HEADLINE_METRICS, "n_images", "n_patients", "n_genuine_pairs", "n_impostor_pairs"}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )


@pytest.mark.slow
def test_models_lists_every_variant(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--input-size", "64", "--width", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["variant"] for r in rows} == {"ir", "ir_se", "sphere", "resnet"}
    assert all(r["params"] > 0 and r["gflops"] > 0 for r in rows)
    assert main(["models", "--input-size", "64", "--width", "8"]) == 0
    assert "GFLOPs" in capsys.readouterr().out


@pytest.mark.server
def test_evaluate_json_prints_exactly_one_object(tiny_checkpoint: Path, phantom_set: Path) -> None:
    result = _run(
        "evaluate",
        "--model",
        str(tiny_checkpoint),
        "--manifest",
        str(phantom_set),
        "--json",
        "--bootstrap",
        "5",
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)  # the whole stdout is one JSON object
    assert payload.keys() >= REQUIRED_KEYS
    assert payload["n_images"] == 18 and payload["n_patients"] == 6
    assert payload["split"].startswith("all images")


def test_evaluate_writes_plots(
    tiny_checkpoint: Path, phantom_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "evaluate",
            "--model",
            str(tiny_checkpoint),
            "--manifest",
            str(phantom_set),
            "--bootstrap",
            "0",
            "--plots",
            str(tmp_path / "plots"),
        ]
    )
    assert code == 0
    assert "auc" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["roc.png", "score_histogram.png"]


def test_phantoms_command_writes_a_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["phantoms", str(tmp_path / "ph"), "--patients", "3", "--studies", "2", "--size", "64"]) == 0
    manifest = Path(capsys.readouterr().out.strip())
    assert manifest.is_file() and len(manifest.read_text().splitlines()) == 7


@pytest.mark.server
def test_bad_paths_fail_with_a_message_not_a_traceback(tmp_path: Path) -> None:
    result = _run("evaluate", "--model", str(tmp_path / "missing.pt"), "--manifest", str(tmp_path / "m.csv"))
    assert result.returncode == 2
    assert "not found" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.server
def test_evaluate_checks_the_manifest_before_loading_a_model(tmp_path: Path) -> None:
    """A typo in the manifest fails at once, with the manifest named, whatever the model."""
    result = _run("evaluate", "--manifest", str(tmp_path / "typo.csv"), "--model", "README.md")
    assert result.returncode == 2
    assert "manifest not found" in result.stderr and "checkpoint" not in result.stderr


@pytest.mark.server
def test_missing_images_are_named_before_the_model_loads(tmp_path: Path) -> None:
    manifest = tmp_path / "site" / "manifest.csv"
    manifest.parent.mkdir()
    manifest.write_text("path,patient_id\nimgs/a.png,p1\nimgs/b.png,p1\n")
    result = _run("evaluate", "--manifest", str(manifest), "--model", "README.md")
    assert result.returncode == 2
    assert "2 of 2 image(s) not found" in result.stderr
    assert "relative to the CSV's folder" in result.stderr and "checkpoint" not in result.stderr
