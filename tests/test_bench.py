"""The benchmarks under bench/: they run, say so plainly without data, and format their tables."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT / "bench"


def _load(name: str) -> ModuleType:
    """Import bench/<name>.py as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a bench script the way the README says, from the repo root."""
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def accuracy() -> ModuleType:
    return _load("accuracy")


def _result(dataset: str, **overrides: Any) -> dict[str, Any]:
    """A hand-made result shaped like models.evaluate.evaluate's."""
    result = {
        "dataset": dataset,
        "split": "test patients of the checkpoint's split",
        "n_images": 100,
        "n_patients": 40,
        "n_genuine_pairs": 120,
        "n_impostor_pairs": 4830,
        "min_resolvable_far": 1 / 4830,
        "auc": 0.95,
        "eer": 0.1,
        "tar_at_far_1e-2": 0.8,
        "tar_at_far_1e-3": 0.6,
        "tar_at_far_1e-4": 0.5,
        "precision_at_1": 0.9,
        "r_precision": 0.7,
        "map_at_r": 0.65,
        "ci": {"auc": [0.93, 0.97], "eer": [0.08, 0.12], "precision_at_1": [0.85, 0.94]},
        "breakdown": {
            "view_pair": {
                "PA-PA": {
                    "n_genuine_pairs": 80,
                    "n_impostor_pairs": 2000,
                    "auc": 0.96,
                    "auc_vs_all_impostors": 0.955,
                    "tar_at_far_1e-3": 0.62,
                    "mean_genuine_score": 0.71,
                }
            },
            "time_gap_days": {
                ">365": {
                    "n_genuine_pairs": 12,
                    "auc": 0.9,
                    "auc_vs_all_impostors": 0.9,
                    "tar_at_far_1e-3": 0.4,
                    "mean_genuine_score": 0.6,
                }
            },
        },
    }
    result.update(overrides)
    return result


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_accuracy_without_data_says_so_and_exits_0(tmp_path: Path, where: str) -> None:
    data_dir = tmp_path / "nowhere" if where == "missing" else tmp_path
    proc = _run("accuracy.py", "--data-dir", str(data_dir))
    assert proc.returncode == 0, proc.stderr
    assert "nothing to measure; this benchmark needs the real sets" in proc.stdout
    assert "|" not in proc.stdout  # no table


def test_headline_table_has_a_row_per_result_with_intervals(accuracy: ModuleType) -> None:
    results = [
        _result("set-a"),
        _result("set-b", auc=None, ci={}, n_impostor_pairs=1_000_000, n_images=2000),
    ]
    table = accuracy.format_headline_table(results)
    lines = table.splitlines()
    assert len(lines) == 2 + len(results)  # header, rule, one row each
    assert lines[0].startswith("| set |") and "AUC [95% CI]" in lines[0]
    row_a, row_b = lines[2], lines[3]
    assert row_a.startswith("| set-a | test patients of the checkpoint's split | 100 | 40 |")
    assert "0.9500 [0.9300, 0.9700]" in row_a  # AUC with its CI
    assert "0.1000 [0.0800, 0.1200]" in row_a  # EER
    assert "0.9000 [0.8500, 0.9400]" in row_a  # P@1
    assert "| 0.7000 | 0.6500 |" in row_a  # R-precision, mAP@R without CI
    assert "| 0.5000* |" in row_a  # 4,830 impostor pairs cannot resolve FAR 1e-4
    assert "| 0.6000 |" in row_a  # ... but can resolve 1e-3
    assert "120 / 4,830 |" in row_a
    assert row_b.startswith("| set-b |") and "| n/a |" in row_b
    assert "120 / 1,000,000 (sampled)" in row_b


def test_tables_include_breakdowns(accuracy: ModuleType) -> None:
    text = accuracy.format_tables([_result("set-a")], title="title line")
    assert text.startswith("title line\n")
    assert "| set-a | view pair | PA-PA | 80 | 2,000 | 0.9600 | 0.9550 | 0.6200 | 0.7100 |" in text
    assert "| set-a | time gap (days) | >365 | 12 | all | - | 0.9000 |" in text
    assert accuracy.format_breakdown_table([_result("x", breakdown={})]) is None


def test_accuracy_on_a_phantom_set(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from models.phantom import write_phantom_set

    manifest = write_phantom_set(tmp_path / "phantom-set", 6, 3, size=96)
    out = tmp_path / "results.json"
    proc = _run(
        "accuracy.py",
        "--manifest",
        str(manifest),
        "--model",
        str(tiny_checkpoint),
        "--bootstrap",
        "5",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "| phantom-set | all images (set not used in training) | 18 | 6 |" in proc.stdout
    assert "AUC [95% CI]" in proc.stdout
    payload = json.loads(out.read_text())
    assert [r["dataset"] for r in payload["results"]] == ["phantom-set"]
    assert payload["results"][0]["n_images"] == 18 and payload["errors"] == []


def test_speed_quick_prints_its_table(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    # --threads 1: on a machine whose cores are busy, multi-threaded OpenMP can be far slower.
    proc = _run(
        "speed.py",
        "--quick",
        "--model",
        str(tiny_checkpoint),
        "--threads",
        "1",
        "--sizes",
        "2000",
        "--budget",
        "30",  # a cap, not a wait: a busy machine must not skip the gallery stage
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "| stage | case | runs | p50 ms | p95 ms | rate | notes |" in proc.stdout
    for stage in ("decode+prepare", "model forward", "gallery search"):
        assert f"| {stage} |" in proc.stdout
    assert "batch 32, 64 px" in proc.stdout
    assert "Flat, N=2,000, k=10" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    flat = next(r for r in rows if r["case"].startswith("Flat"))
    assert flat["extra"]["recall"] == 1.0  # exact search finds the exact neighbours


def test_sweep_table_has_a_row_per_variant_and_set() -> None:
    sweep = _load("sweep")
    result = {
        "dataset": "s",
        "n_images": 10,
        "auc": 0.9,
        "eer": 0.1,
        "tar_at_far_1e-2": 0.5,
        "precision_at_1": 0.7,
        "ci": {"auc": [0.85, 0.95]},
    }
    table = sweep.format_rows(
        [
            {"name": "a", "epochs": 3, "results": [result]},
            {"name": "b", "epochs": 4, "results": [result, {**result, "dataset": "t"}]},
        ]
    )
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    assert "| a | 3 | s | 10 | 0.900 [0.850, 0.950] | 0.100 | 0.500 | 0.700 |" in lines


def test_sweep_refuses_a_missing_pretrained_checkpoint(tmp_path: Path) -> None:
    result = _run("sweep.py", "--init-from", str(tmp_path / "nope.pt"))
    assert result.returncode == 2
    assert "no such checkpoint" in result.stderr
