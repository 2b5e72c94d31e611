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
    """A hand-made result shaped like models.evaluation.evaluate.evaluate's."""
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
    assert "`cxr-reid data SOURCE ROOT" in proc.stdout  # and how to make some
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
    from models.imaging.phantom import write_phantom_set

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
    title = proc.stdout.splitlines()[0]
    assert " /" not in title and "(/" not in title, f"absolute path in the report: {title}"
    assert "phantom-set/manifest.csv" in title
    payload = json.loads(out.read_text())
    assert [r["dataset"] for r in payload["results"]] == ["phantom-set"]
    assert payload["results"][0]["n_images"] == 18 and payload["errors"] == []


@pytest.mark.slow
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


@pytest.mark.slow
def test_embed_reports_efficiency_and_variants(tiny_checkpoint: Path) -> None:
    proc = _run(
        "embed.py", "--model", str(tiny_checkpoint), "--seconds", "0.05", "--json",
        "--variants", "nchw", "onednn_fusion", "onnxruntime",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    for key in (
        "images_per_s_batch1",
        "images_per_s_batch32",
        "model_gflops_per_image",
        "matmul_gflops_per_s",
    ):
        assert figures[key] > 0
    assert figures["efficiency"] == pytest.approx(
        figures["model_gflops_per_image"] * figures["images_per_s_batch32"] / figures["matmul_gflops_per_s"]
    )
    assert set(figures["variants"]) == {"default", "nchw", "onednn_fusion", "onnxruntime"}
    nchw = figures["variants"]["nchw"]  # same network, other memory layout: same embeddings
    assert nchw["min_cosine_to_default"] > 0.9999 and nchw["images_per_s_batch32"] > 0
    for name in ("onednn_fusion", "onnxruntime"):  # the tiny net pools unevenly (or onnx is not
        row = figures["variants"][name]  # installed): a runtime may refuse it, and says so
        assert row["error"] if "error" in row else row["min_cosine_to_default"] > 0.9999


def test_generalisation_without_data_says_so(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[data]\nmanifests = ["nowhere/a/manifest.csv", "nowhere/b/manifest.csv"]\n')
    result = _run("generalisation.py", "--config", str(config), "--out", str(tmp_path / "out"))
    assert result.returncode == 0 and "nothing to measure" in result.stdout


@pytest.mark.slow
def test_generalisation_trains_a_fold_per_set_and_reports_unseen_sites_first(tmp_path: Path) -> None:
    """Two phantom 'sites', a tiny recipe: each fold trains without one site and is scored on all of
    it; the unseen table comes first, then thresholds there, then the seen sets; a rerun trains
    nothing and a fold folder of another recipe is refused."""
    from models.imaging.phantom import write_phantom_set

    for name, seed in (("site-a", 1), ("site-b", 2)):
        write_phantom_set(tmp_path / "data" / name, 24, 3, size=48, seed=seed)
    config = tmp_path / "tiny.toml"
    config.write_text(
        f'name = "tiny"\n[data]\nmanifests = ["data/site-a/manifest.csv", "data/site-b/manifest.csv"]\n'
        f'cache_dir = "{tmp_path / "cache"}"\nval_fraction = 0.25\ntest_fraction = 0.25\n'
        "[backbone]\nwidth = 8\nembedding_dim = 32\n[preprocess]\nsize = 48\n"
        '[optim]\nepochs = 1\nsteps_per_epoch = 2\npatients_per_batch = 4\ndevice = "cpu"\n'
    )
    out = tmp_path / "out"
    args = ["--config", str(config), "--out", str(out), "--bootstrap", "10", "--repeats", "1"]
    args += ["--snorm-top-k", "10", "--jobs", "2", "--json", str(tmp_path / "g.json")]
    result = _run("generalisation.py", *args, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    assert text.index("Unseen sites") < text.index("Thresholds at the unseen site") < text.index("Seen sets")
    assert "| site-a | `holdout-site-a-" in text and "| **mean** |" in text
    folds = json.loads((tmp_path / "g.json").read_text())["folds"]
    assert set(folds) == {"site-a", "site-b"}
    unseen = folds["site-a"]["sets"]["site-a"]
    assert unseen["split"].startswith("all images") and unseen["n_images"] == 72
    assert set(unseen["calibration"]["fars"]) == {"1e-2", "1e-3"}
    assert folds["site-a"]["sets"]["site-b"]["split"].startswith("test patients")
    # a rerun finds both folds trained and evaluated: nothing is retrained
    again = _run("generalisation.py", *args, timeout=300)
    assert again.returncode == 0 and "training (log" not in again.stderr
    # a fold averaged with itself (the smallest "ensemble") scores as the fold alone
    ensemble = _run(
        "generalisation.py",
        *args[:-2],
        "--no-train",
        "--ensemble",
        str(out),
        "--json",
        str(tmp_path / "e.json"),
        timeout=300,
    )
    assert ensemble.returncode == 0, ensemble.stderr[-2000:]
    paired = json.loads((tmp_path / "e.json").read_text())["folds"]["site-a"]["sets"]["site-a"]
    assert paired["auc"] == pytest.approx(unseen["auc"], abs=1e-4)
    # a fold folder of another recipe is not silently reused
    other = _run("generalisation.py", *args, "--set", "backbone.width=16", timeout=300)
    assert other.returncode != 0 and "another recipe" in other.stderr


@pytest.mark.slow
def test_gpu_bench_runs_its_code_path_on_the_cpu() -> None:
    """--quick runs every measurement of the GPU benchmark at toy sizes; on the CPU the embeddings it
    compares are the CPU's own, so the cosine must be 1."""
    proc = _run("gpu.py", "--quick", "--device", "cpu", "--seconds", "0.05", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    assert set(figures["recipes"]) == {"shipped", "gpu"}
    for recipe in figures["recipes"].values():
        assert recipe["forward_gflops_per_image"] > 0
        assert recipe["train_gflops_per_view"] > 2 * recipe["forward_gflops_per_image"]  # backward counted
        assert recipe["train_views_per_s"] > 0 and recipe["train_precision"] == "fp32"
    assert figures["enroll"]["checked_images"] > 7  # the example radiographs and random inputs
    assert figures["enroll"]["min_cosine_to_cpu"] > 0.99999


@pytest.mark.slow
def test_decode_compares_full_and_needed_resolution() -> None:
    """Each speed row times both decodes of a real radiograph and says how close the embeddings are."""
    proc = _run(
        "decode.py", "--speed-only", "--seconds", "0", "--only", "uncompressed", "JPEG 1955", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["speed"]["cases"]
    if not rows:
        pytest.skip("pydicom-data's RG1 radiograph is not installed")
    assert set(rows) == {"DICOM 1955x1841 uncompressed", "JPEG 1955x1841 8-bit"}
    for row in rows.values():
        assert row["full_ms"] > 0 and row["needed_resolution_ms"] > 0
        assert row["cosine_full_vs_needed"] > 0.999


@pytest.mark.server
@pytest.mark.slow
def test_service_bench_reports_each_cell_and_the_goals(tmp_path: Path) -> None:
    proc = _run(
        "service.py", "--seconds", "1", "--max-requests", "4", "--concurrency", "1", "2",
        "--routes", "verify", "--json", timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    assert set(figures["cells"]) == {"verify@1", "verify@2"}
    for cell in figures["cells"].values():
        assert 1 <= cell["requests"] <= 4 and cell["failures"] == 0
        assert cell["images_per_s"] == pytest.approx(2 * cell["requests_per_s"])
    assert figures["goals"]["verify_c1_p50_over_decode_plus_model"] > 0


@pytest.mark.slow
def test_search_bench_reports_every_index_on_patient_clusters() -> None:
    """Flat is the ground truth (recall 1), and the drawn clusters separate genuine from impostor."""
    # IVF-PQ is left out: FAISS trains PQ very slowly on fewer than 39 * 256 vectors
    proc = _run(
        "search.py", "--n", "2000", "--queries", "50", "--threads", "1", "--json",
        "--indexes", "Flat,HNSW32,IVF-Flat,IVF-SQ8,IVF-PQfs-RFlat",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    assert figures["n"] == 2000 and figures["queries"] == 50 and figures["threads"] == 1
    data = figures["data"]
    assert data["mean_genuine_cosine"] > data["mean_impostor_cosine"] + 0.2
    rows = figures["results"]
    assert {r["index"] for r in rows} == {"Flat", "HNSW32", "IVF-Flat", "IVF-SQ8", "IVF-PQfs-RFlat"}
    for row in rows:
        assert {"recall_at_10", "p50_ms", "p99_ms", "bytes_per_vector", "build_s"} <= set(row)
        assert 0.0 <= row["recall_at_10"] <= 1.0 and 0 < row["p50_ms"] <= row["p99_ms"]
    (flat,) = [r for r in rows if r["index"] == "Flat"]
    assert flat["recall_at_10"] == 1.0 and flat["bytes_per_vector"] >= 4 * figures["dim"]


@pytest.mark.slow
def test_enroll_bench_times_decode_embed_and_the_whole_path() -> None:
    proc = _run(
        "enroll.py", "--images", "6", "--side", "400", "--batch-size", "4", "--device", "cpu", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    assert figures["enrolled"] == 6 and figures["failed"] == 0 and figures["device"] == "cpu"
    for key in ("decode_images_per_s", "embed_images_per_s", "enrol_images_per_s"):
        assert figures[key] > 0


@pytest.mark.slow
def test_audit_bench_plants_errors_and_scores_them(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from models.imaging.phantom import write_phantom_set

    write_phantom_set(tmp_path / "data" / "phantoms", 12, 3, size=96, seed=3)
    proc = _run(
        "audit.py",
        "--data-dir", str(tmp_path / "data"), "--sets", "phantoms", "--model", str(tiny_checkpoint),
        "--per-type", "1", "--out", str(tmp_path / "out"), "--json", str(tmp_path / "t.json"),
        timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = json.loads((tmp_path / "t.json").read_text())["sets"]["phantoms"]["planted"]
    # byte copies and truncated files are found whatever the model knows
    assert table["exact_duplicate"]["found"] >= 1 and table["outlier"]["planted"] == 2
    assert table["outlier"]["found"] >= 1 and "recall" in proc.stdout
    assert (tmp_path / "out" / "phantoms" / "planted" / "report.html").is_file()
    assert "no data" in _run("audit.py", "--data-dir", str(tmp_path / "nowhere")).stdout
