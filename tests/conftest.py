"""Shared fixtures: a small random-weight checkpoint and a few phantom images.

Random weights still embed deterministically, so identical bytes score 1.0; tests that need a
model that knows identity train one (tests/test_train_e2e.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A width-8 IR-18 at 64 px with a 128-d embedding and a fitted calibration."""
    from models.backbones import BackboneConfig, build_backbone
    from models.calibration import Calibration
    from models.checkpoint import save_checkpoint
    from models.preprocess import PreprocessConfig

    torch.manual_seed(0)
    backbone_config = BackboneConfig(variant="ir", depth=18, width=8, embedding_dim=128)
    network = build_backbone(backbone_config).eval()
    rng = np.random.default_rng(0)
    calibration = Calibration.fit(
        np.clip(rng.normal(0.8, 0.08, 500), -1, 1), np.clip(rng.normal(0.2, 0.15, 20_000), -1, 1)
    )
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.pt"
    save_checkpoint(
        path,
        name="tiny-test",
        backbone_config=backbone_config.to_dict(),
        preprocess_config=PreprocessConfig(size=64).to_dict(),
        state_dict=network.state_dict(),
        calibration=calibration.to_dict(),
        training_summary={"note": "random weights for tests"},
        metrics={},
    )
    return path


@pytest.fixture(scope="session")
def phantom_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest of 6 phantom patients x 3 studies as PNG; returns the manifest path."""
    from models.phantom import write_phantom_set

    return write_phantom_set(tmp_path_factory.mktemp("phantoms"), 6, 3, size=128, fmt="png", seed=1)


@pytest.fixture(scope="session")
def phantom_images(phantom_set: Path) -> list[Path]:
    """The phantom PNG files, three per patient, in manifest order."""
    import csv

    with phantom_set.open() as handle:
        return [phantom_set.parent / row["path"] for row in csv.DictReader(handle)]
