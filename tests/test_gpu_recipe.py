"""The GPU recipe runs its data path and a training step on the CPU, and its checkpoint travels in
parts of bounded size that rejoin to the same bytes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.checkpoint import CheckpointError, join_parts, load_checkpoint, split_file
from models.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_gpu_config_is_the_default_recipe_scaled_up() -> None:
    config = load_config(REPO_ROOT / "configs" / "gpu.toml")
    assert (config.backbone.variant, config.backbone.depth, config.backbone.width) == ("ir", 50, 64)
    assert config.preprocess.size == 224 and config.optim.device == "cuda"
    assert config.optim.amp and config.optim.channels_last and 0 < config.optim.max_minutes <= 8
    assert config.data.balance_sets and len(config.data.manifests) == 3


def test_train_gpu_script_runs_one_step_on_the_cpu_and_splits_the_checkpoint(tmp_path: Path) -> None:
    from models.phantom import write_phantom_set

    for name, seed in (("site-a", 1), ("site-b", 2)):
        write_phantom_set(tmp_path / "data" / name, 12, 2, size=64, seed=seed)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "RUN_DIR": str(tmp_path / "run")}
    overrides = [
        'optim.device="cpu"',
        "optim.epochs=1",
        "optim.steps_per_epoch=1",
        "optim.patients_per_batch=4",
        "backbone.width=16",  # the recipe's depth at a quarter of its width: the path, not the cost
        "preprocess.size=64",
        f'data.cache_dir="{tmp_path / "cache"}"',
    ]
    command = ["bash", "scripts/train-gpu.sh", str(tmp_path / "data"), str(out)]
    for item in overrides:
        command += ["--set", item]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    index = out / "model.pt.parts.json"
    assert index.is_file() and (out / "metrics.jsonl").is_file() and (out / "train.log").is_file()
    joined = join_parts(index, tmp_path / "joined.pt")
    payload = load_checkpoint(joined)
    assert payload["backbone"]["depth"] == 50 and payload["training"]["steps_per_epoch"] == 1
    assert sorted(payload["training"]["sets"]) == ["site-a", "site-b"]


def test_parts_rejoin_to_the_same_bytes_or_refuse(tmp_path: Path) -> None:
    original = tmp_path / "model.pt"
    original.write_bytes(os.urandom(100_000))
    index = split_file(original, tmp_path / "parts", part_bytes=30_000)
    parts = sorted((tmp_path / "parts").glob("model.pt.part[0-9]*"))
    assert len(parts) == 4 and all(p.stat().st_size <= 30_000 for p in parts)
    assert join_parts(index, tmp_path / "back.pt").read_bytes() == original.read_bytes()
    parts[1].write_bytes(parts[1].read_bytes()[:-1] + b"x")
    with pytest.raises(CheckpointError, match="do not add up"):
        join_parts(index, tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()
    parts[2].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        join_parts(index, tmp_path / "bad.pt")


def test_checkpoint_cli_splits_and_joins(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from app.cli import main

    assert (
        main(["checkpoint", "split", str(tiny_checkpoint), "--out", str(tmp_path), "--part-mib", "0.1"]) == 0
    )
    index = tmp_path / f"{tiny_checkpoint.name}.parts.json"
    assert main(["checkpoint", "join", str(index), "--out", str(tmp_path / "again.pt")]) == 0
    assert load_checkpoint(tmp_path / "again.pt")["model_id"] == load_checkpoint(tiny_checkpoint)["model_id"]
    assert main(["checkpoint", "join", str(index)]) == 2  # --out is needed
