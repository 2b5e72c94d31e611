"""The shipped default model: present, small, loadable, calibrated, and used when none is named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from app.cli import main
from models.net.checkpoint import load_checkpoint
from models.net.embedder import DEFAULT_CHECKPOINT, Embedder


@pytest.fixture(scope="module")
def default_embedder() -> Embedder:
    return Embedder.from_checkpoint(None)


def test_shipped_checkpoint_is_complete_and_small() -> None:
    assert DEFAULT_CHECKPOINT.is_file()
    assert DEFAULT_CHECKPOINT.stat().st_size <= 16 * 1024 * 1024
    payload = load_checkpoint(DEFAULT_CHECKPOINT)
    assert payload["backbone"]["embedding_dim"] == 512
    thresholds = payload["calibration"]["thresholds"]
    assert thresholds["1e-4"] >= thresholds["1e-3"] >= thresholds["1e-2"]
    assert set(payload["training"]["sets"]) == {
        "covid-collection",
        "kermany-paediatric",
        "nih-cxr14-64px",
        "nih-cxr14-512px",
    }
    assert payload["metrics"]["val"]["auc"] > 0.5


def test_default_model_embeds_a_real_chest_cr_the_same_in_two_encodings(default_embedder: Embedder) -> None:
    files = [get_testdata_file(name) for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm")]
    if any(f is None for f in files):
        pytest.skip("pydicom-data's RG1 chest CR is not installed")
    vectors = default_embedder.embed(files)
    assert vectors.shape == (2, 512)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert float(vectors[0] @ vectors[1]) > 0.99  # lossless J2K decodes to the same pixels


def test_evaluate_without_model_uses_the_shipped_checkpoint(
    phantom_set: Path, capsys: pytest.CaptureFixture[str], default_embedder: Embedder
) -> None:
    assert main(["evaluate", "--manifest", str(phantom_set), "--json", "--bootstrap", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model_id"] == default_embedder.model_id
