"""End to end: train a small model on phantoms on the CPU, then verify on phantoms it never saw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.evaluation.evaluate import evaluate
from models.imaging.phantom import write_phantom_set
from models.training.train import TrainConfig, load_config, train

pytestmark = pytest.mark.slow


def test_phantom_training_generalises_to_unseen_patients(tmp_path: Path) -> None:
    train_manifest = write_phantom_set(tmp_path / "phantom-train", 150, 4, size=96, seed=11)
    test_manifest = write_phantom_set(tmp_path / "phantom-test", 16, 3, size=96, seed=12345)
    config = TrainConfig.from_dict(
        {
            "name": "phantom-e2e",
            "output_dir": str(tmp_path / "run"),
            "data": {
                "manifests": [str(train_manifest)],
                "val_fraction": 0.2,
                "test_fraction": 0.0,
                "cache_dir": str(tmp_path / "cache"),
            },
            "backbone": {"variant": "ir", "depth": 18, "width": 16, "embedding_dim": 64},
            "preprocess": {"size": 64},
            "head": {"name": "arcface", "s": 16.0, "margins": {"arcface": 0.2}},
            "optim": {
                "epochs": 12,  # bounded by epochs, not minutes: AUC 0.98 on unseen phantoms
                "patients_per_batch": 16,
                "images_per_patient": 2,
                "lr": 3e-3,
                "warmup_epochs": 1,
                "device": "cpu",
            },
        }
    )
    checkpoint = train(config, progress=False)
    assert checkpoint.is_file()
    history = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert history and all("val_auc" in h for h in history)
    assert (tmp_path / "run" / "splits.csv").is_file() and (tmp_path / "run" / "last.pt").is_file()

    result = evaluate(test_manifest, model=checkpoint, bootstrap=20, progress=False)
    assert result["split"].startswith("all images")  # a set the model never saw
    assert result["n_patients"] == 16 and result["n_images"] == 48
    assert result["auc"] >= 0.95, result

    # --resume continues from last.pt instead of starting over.
    resumed = load_config(
        str(tmp_path / "run" / "config.toml"),
        ["optim.epochs=" + str(len(history) + 1), "optim.max_minutes=0.0"],
    )
    train(resumed, resume=True, progress=False)
    again = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(again) == len(history) + 1

    # optim.init_from starts another run from these weights (the head starts fresh): with a
    # learning rate of zero its first epoch validates like the trained model, not a random one.
    best_auc = max(h["val_auc"] for h in history)
    warm = load_config(
        str(tmp_path / "run" / "config.toml"),
        [
            f"output_dir={tmp_path / 'warm'}",
            f"optim.init_from={checkpoint}",
            "optim.epochs=1",
            "optim.lr=0.0",
            "optim.max_minutes=0.0",
        ],
    )
    train(warm, progress=False)
    first = json.loads((tmp_path / "warm" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["val_auc"] > best_auc - 0.05 and first["val_auc"] > 0.8

    other = load_config(
        str(tmp_path / "run" / "config.toml"),
        [f"output_dir={tmp_path / 'other'}", f"optim.init_from={checkpoint}", "backbone.width=8"],
    )
    with pytest.raises(ValueError, match="differs in: width"):
        train(other, progress=False)


@pytest.mark.server
def test_torchrun_ddp_trains_on_cpu(tmp_path: Path) -> None:
    """Two processes under torchrun (gloo on the CPU) train one model and write one checkpoint."""
    import subprocess
    import sys

    manifest = write_phantom_set(tmp_path / "ph", 24, 3, size=64, seed=3)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "app.cli",
        "train",
        "--manifest",
        str(manifest),
        "--output",
        str(tmp_path / "run"),
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        "--set",
        "backbone.width=8",
        "--set",
        "backbone.embedding_dim=32",
        "--set",
        "preprocess.size=64",
        "--set",
        "optim.patients_per_batch=4",
        "--set",
        f'data.cache_dir="{tmp_path / "cache"}"',
        "--max-minutes",
        "0.0001",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=180, cwd=Path(__file__).resolve().parents[1]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "model.pt").is_file()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # the time budget stopped both ranks after the first epoch
