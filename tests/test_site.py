"""Site calibration: refusals that say what is missing, threshold intervals, the split-half
measurement of the FAR delivered, AS-norm, and the calibrated checkpoint copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_site

from models.evaluation.metrics import pair_scores
from models.net.checkpoint import load_checkpoint
from models.training.site import (
    MIN_FALSE_ACCEPTS,
    CalibrationRefusedError,
    calibrate_checkpoint,
    check_resolvable,
    fit_site_calibration,
    pair_counts,
    separation_auc,
    split_half,
)


def test_pair_counts_match_the_pairs() -> None:
    counts = pair_counts(["a", "a", "a", "b", "c", "c"])
    assert (counts.images, counts.patients, counts.genuine, counts.impostor) == (6, 3, 4, 11)


def test_refusal_names_what_is_missing_and_how_much_more() -> None:
    _, ids = synthetic_site(30, 3, noise=0.5)  # 90 images: 90 genuine, 3,915 impostor pairs
    check_resolvable(pair_counts(ids), ["1e-2"])  # 1,000 needed: fine
    with pytest.raises(CalibrationRefusedError) as info:
        check_resolvable(pair_counts(ids), ["1e-2", "1e-3"])
    message = str(info.value)
    assert "FAR 1e-3 needs at least 10,000 different-patient pairs" in message
    assert "there are 3,915" in message and "more labelled images of new patients" in message
    assert "FAR 1e-2" not in message  # only the FAR that cannot be resolved
    # the number of images it asks for is enough
    more = int(message.split("about ")[1].split(" more")[0].replace(",", ""))
    grown = pair_counts([*ids, *[f"new{i}" for i in range(more)]])
    assert grown.impostor >= 10_000
    with pytest.raises(CalibrationRefusedError, match="same-patient pair"):
        check_resolvable(pair_counts([f"p{i}" for i in range(200)]), ["1e-2"])
    with pytest.raises(CalibrationRefusedError, match="patient"):
        check_resolvable(pair_counts(["a"] * 50 + ["b"] * 50), ["1e-2"])


def test_site_calibration_records_provenance_and_intervals() -> None:
    vectors, ids = synthetic_site(120, 3, noise=0.9)
    calibration = fit_site_calibration(
        vectors, ids, fars=("1e-2", "1e-3"), bootstrap=50, provenance={"data": "test"}, score_norm=False
    )
    assert calibration.source == "site" and set(calibration.thresholds) == {"1e-2", "1e-3"}
    p = calibration.provenance
    assert p["images"] == 360 and p["patients"] == 120 and p["data"] == "test" and p["fitted_at"]
    for far, (low, high) in p["threshold_ci"].items():
        assert low <= calibration.thresholds[far] <= high + 1e-6
    assert calibration.thresholds["1e-3"] > calibration.thresholds["1e-2"]
    # FARs below what the data resolves are refused, not extrapolated
    with pytest.raises(ValueError, match="outside the calibrated range"):
        calibration.threshold_for(1e-5)
    with pytest.raises(CalibrationRefusedError, match="default FAR"):
        fit_site_calibration(vectors, ids, fars=("1e-2",))


def test_split_half_delivers_the_promised_far_where_shipped_thresholds_do_not() -> None:
    from models.evaluation.metrics import pair_scores
    from models.scoring.calibration import Calibration

    vectors, ids = synthetic_site(200, 3, noise=1.0, seed=3)
    # "shipped" thresholds from a site whose impostors score lower (a model trained elsewhere)
    other, other_ids = synthetic_site(200, 3, noise=0.3, seed=4)
    genuine, impostor, *_ = pair_scores(other * 0.6, other_ids)
    shipped = Calibration.fit(genuine, impostor)
    result = split_half(vectors, ids, repeats=3, shipped=shipped, snorm_top_k=50)
    for far, row in result["fars"].items():
        promised = float(far)
        assert row["site_far"]["mean"] <= 2 * promised + MIN_FALSE_ACCEPTS / 40_000
        assert row["shipped_far"]["mean"] > 2 * promised  # the shipped promise breaks at this site
        assert 0.0 <= row["site_tar"]["mean"] <= 1.0 and "snorm_far" in row
    assert 0.5 < result["fars"]["1e-2"]["auc_snorm"]["mean"] <= 1.0


def test_calibrate_checkpoint_writes_a_copy_or_nothing(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from models.imaging.phantom import write_phantom_set

    manifest = write_phantom_set(tmp_path / "site", 25, 3, size=64, seed=5)
    out = tmp_path / "site.pt"
    with pytest.raises(CalibrationRefusedError, match="FAR 1e-3"):
        calibrate_checkpoint(manifest, out, model=tiny_checkpoint, progress=False)
    assert not out.exists()  # refused: nothing written
    calibration = calibrate_checkpoint(
        manifest, out, model=tiny_checkpoint, fars=("1e-2",), default_far="1e-2", bootstrap=20, progress=False
    )
    original, copy = load_checkpoint(tiny_checkpoint), load_checkpoint(out)
    assert copy["model_id"] == original["model_id"]  # same weights: galleries stay valid
    assert copy["calibration"]["source"] == "site" and calibration.provenance["manifest"] == "manifest.csv"
    assert len(copy["calibration"]["provenance"]["manifest_sha256"]) == 64
    assert copy["calibration"]["provenance"]["patients"] == 25
    assert copy["calibration"]["score_norm"]["method"] == "as-norm"  # on by default


def test_site_calibration_refuses_images_without_identity() -> None:
    """Noise filed under patient ids (the same-patient pairs score like any other) is refused before
    anything is fitted; a weak but real site is not."""
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(230, 32)).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    ids = [f"p{i // 3}" for i in range(230)]
    with pytest.raises(CalibrationRefusedError, match=r"score alike here \(AUC 0\.[45]"):
        fit_site_calibration(noise, ids, fars=("1e-2",), default_far="1e-2", bootstrap=0)
    weak, weak_ids = synthetic_site(120, 3, noise=1.6, seed=5)
    assert 0.6 < separation_auc(*pair_scores(weak, weak_ids)[:2]) < 0.95
    fit_site_calibration(weak, weak_ids, fars=("1e-2",), default_far="1e-2", bootstrap=0, score_norm=False)
