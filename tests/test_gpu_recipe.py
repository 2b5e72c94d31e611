"""The GPU call is rehearsed on the CPU (scripts/train_gpu.py: every run of two recipes and their
folds, bundled, sent in two parts, unpacked), and a checkpoint travels in parts of bounded size that
rejoin to the same bytes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models.net.checkpoint import CheckpointError, join_parts, load_checkpoint, split_file
from models.training.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def train_gpu_main(argv: list[str]) -> int:
    """``scripts/train_gpu.py``'s main (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("train_gpu", REPO_ROOT / "scripts" / "train_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_gpu"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.main(argv)


def test_gpu_config_is_the_shipped_network_scaled_up() -> None:
    config = load_config(REPO_ROOT / "configs" / "gpu.toml")
    assert (config.backbone.variant, config.backbone.depth, config.backbone.width) == ("ir", 18, 32)
    assert config.preprocess.size == 224 and config.optim.device == "cuda"
    assert config.optim.amp and config.optim.channels_last
    assert config.data.balance_sets and len(config.data.manifests) == 4
    assert config.data.site_names([Path(m).parent.name for m in config.data.manifests]) == [
        "nih-cxr14",
        "covid-collection",
        "kermany-paediatric",
    ]
    small = load_config(REPO_ROOT / "configs" / "gpu-160.toml")
    assert small.preprocess.size == 160 and small.optim == config.optim


@pytest.mark.slow
def test_train_gpu_rehearses_every_run_on_the_cpu_and_bundles_them(tmp_path: Path) -> None:
    """The device call's script, end to end on the CPU: two recipes, their folds by site (two sets of
    one hospital held out together), the schedule fitted to the budget, the bundle cut into parts
    of which some are sent now and the rest later, and the runs unpacked back here."""
    from models.imaging.phantom import write_phantom_set

    for name, seed in (("site-a", 1), ("site-b", 2), ("hospital-x1", 3), ("hospital-x2", 4)):
        write_phantom_set(tmp_path / "data" / name, 12, 2, size=64, seed=seed)
    out, later = tmp_path / "out", tmp_path / "later"
    command = [sys.executable, "scripts/train_gpu.py", str(tmp_path / "data"), str(out)]
    command += ["--config", "configs/gpu.toml", "configs/gpu-160.toml", "--folds", "--minutes", "0.05"]
    command += ["--runs", str(tmp_path / "runs"), "--bundle", str(tmp_path / "bundle"), "--send", "1"]
    command += ["--part-mib", "1"]
    for item in (
        'optim.device="cpu"',
        "optim.steps_per_epoch=1",
        "optim.patients_per_batch=4",
        "backbone.width=8",  # the recipe's depth at a quarter of its width: the path, not the cost
        "preprocess.size=64",
        'data.sites={"hospital-x"=["hospital-x1","hospital-x2"]}',
        f'data.cache_dir="{tmp_path / "cache"}"',
    ):
        command += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    names = sorted(row["name"] for row in summary)
    assert len(names) == 8 and "cxr-reid-ir18w32-224/holdout-hospital-x" in names
    fold = next(r for r in summary if r["name"] == "cxr-reid-ir18w32-160/holdout-hospital-x")
    assert fold["held_out"] == ["hospital-x1", "hospital-x2"] and fold["epochs_run"] >= 1
    assert all(r["exitcode"] == 0 and r["model_id"] for r in summary)

    spec = json.loads((out / "bundle.tar.parts.json").read_text())
    sent = sorted(p.name for p in out.glob("bundle.tar.part[0-9]*"))
    assert sent == spec["parts"][:1] and len(spec["parts"]) > 1  # the rest waits for a second call
    later.mkdir()
    for name in spec["parts"][1:]:
        shutil.copy(tmp_path / "bundle" / name, later / name)
    assert train_gpu_main(["unpack", str(out), str(later), str(tmp_path / "back")]) == 0
    model = tmp_path / "back" / "cxr-reid-ir18w32-224" / "holdout-hospital-x" / "model.pt"
    payload = load_checkpoint(model)
    assert payload["training"]["fitted_to_minutes"] == 0.05
    assert sorted(payload["training"]["split"]["holdout_sets"]) == ["hospital-x1", "hospital-x2"]


def test_unpack_names_a_missing_part(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(os.urandom(1000))
    split_file(tmp_path / "x", tmp_path / "parts", part_bytes=300)
    (tmp_path / "parts" / "x.part001").unlink()
    (tmp_path / "parts" / "x.parts.json").rename(tmp_path / "parts" / "bundle.tar.parts.json")
    assert train_gpu_main(["unpack", str(tmp_path / "parts"), str(tmp_path / "back")]) == 2


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
