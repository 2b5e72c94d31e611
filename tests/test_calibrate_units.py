"""`cxr-reid calibrate` names what its thresholds are measured in (AS-norm units or cosine) and, for
each FAR, the catch rate it measured and what the FAR means in filings: the words a PACS team reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_site

from index import Gallery, NewImage
from models.net.embedder import Embedder
from models.scoring.calibration import Calibration
from models.training.site import fit_site_calibration


@pytest.mark.parametrize(("score_norm", "unit"), [("as-norm", "AS-norm units"), ("none", "cosine")])
def test_calibrate_prints_the_unit_and_the_catch_rate(
    tmp_path: Path,
    tiny_checkpoint: Path,
    embedder: Embedder,
    capsys: pytest.CaptureFixture[str],
    score_norm: str,
    unit: str,
) -> None:
    from app.cli import main

    data_dir = tmp_path / "data"
    vectors, ids = synthetic_site(80, 2, noise=1.2, seed=3, dim=embedder.dim)
    with Gallery(data_dir, dim=embedder.dim, model_id=embedder.model_id) as gallery:
        gallery.add(vectors, [NewImage(patient_id=p) for p in ids])
    common = ["calibrate", "--data-dir", str(data_dir), "--model", str(tiny_checkpoint), "--bootstrap", "0"]
    common += ["--far", "1e-2,1e-3", "--score-norm", score_norm]
    assert main([*common, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["threshold_unit"] == unit
    assert set(report["catch_rate"]) == {"1e-2", "1e-3"}
    assert 0 < report["catch_rate"]["1e-3"] <= report["catch_rate"]["1e-2"] <= 1

    assert main(common) == 0
    text = capsys.readouterr().out
    with Gallery(data_dir, dim=embedder.dim, model_id=embedder.model_id) as gallery:
        fitted = Calibration.from_dict(gallery.site_calibration())
    for far, wrong in (("1e-2", "10"), ("1e-3", "1")):
        caught = round(100 * fitted.provenance["catch_rate"][far])
        line = next(line for line in text.splitlines() if line.strip().startswith(f"FAR {far}:"))
        assert f"threshold {fitted.thresholds[far]:.4f} {unit}" in line, line
        assert f"of 100 misfiled images about {caught} flagged" in line, line
        assert re.search(rf"of 1,000 correct filings about {wrong} flagged wrongly", line), line


def test_the_catch_rate_is_the_share_of_same_patient_pairs_at_or_above_the_threshold() -> None:
    vectors, ids = synthetic_site(60, 3, noise=1.0, seed=5, dim=32)
    calibration = fit_site_calibration(
        vectors, ids, fars=("1e-2",), default_far="1e-2", bootstrap=0, score_norm=False
    )
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = np.asarray(ids)
    scores = unit @ unit.T
    upper = np.triu(np.ones_like(scores, dtype=bool), k=1)
    genuine = scores[upper & (labels[:, None] == labels[None, :])]
    expected = float(np.mean(genuine >= calibration.thresholds["1e-2"]))
    assert calibration.provenance["catch_rate"]["1e-2"] == pytest.approx(expected)


def test_adapt_prints_the_adapted_thresholds_with_their_unit_and_catch_rate() -> None:
    from app.cli.site import _format_adaptation
    from models.training.adapt import AdaptResult

    split = dict.fromkeys(
        (
            "proof_images",
            "proof_patients",
            "proof_genuine_pairs",
            "proof_impostor_pairs",
            "train_images",
            "train_patients",
        ),
        10,
    )
    result = AdaptResult(
        improved=True, written=True, out="adapted.pt", model_id="m", base_model_id="b",
        before={"auc": 0.9}, after={"auc": 0.95}, delta_auc=0.05, delta_auc_ci=[0.01, 0.09],
        resolvable_fars=["1e-2"], steps_run=1, steps_planned=1, stopped_by_budget=False, minutes=0.1,
        split=split,
        calibration={"thresholds": {"1e-2": 2.5}, "score_norm": "as-norm (cohort 100)",
                     "threshold_ci": {"1e-2": [2.4, 2.6]}, "catch_rate": {"1e-2": 0.63}},
    )  # fmt: skip
    text = _format_adaptation(result)
    assert (
        "FAR 1e-2: threshold 2.5000 AS-norm units [95% CI 2.4000, 2.6000]; catch rate 63%: of 100 "
        "misfiled images about 63 flagged; of 1,000 correct filings about 10 flagged wrongly" in text
    )
