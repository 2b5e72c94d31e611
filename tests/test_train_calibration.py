"""Training's own calibration follows the rule `cxr-reid calibrate` refuses by (one rule,
models.training.site.calibration_problems): a FAR the validation pairs cannot resolve gets no
threshold, and a split that resolves none leaves thresholds marked provisional, with a warning
naming the command that calibrates the model."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from models.scoring.calibration import FAR_KEYS, Calibration
from models.training.site import CalibrationRefusedError, check_resolvable, pair_counts
from models.training.train import calibrate_on_validation

RUN = Path("run") / "model.pt"


def scores(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Genuine and impostor scores, as many as the labels have pairs of each kind."""
    counts = pair_counts(labels)
    rng = np.random.default_rng(seed)
    return (
        np.clip(rng.normal(0.8, 0.08, counts.genuine), -1, 1),
        np.clip(rng.normal(0.2, 0.15, counts.impostor), -1, 1),
    )


def refusal(labels: np.ndarray) -> str:
    """What `cxr-reid calibrate` says about these labels."""
    with pytest.raises(CalibrationRefusedError) as refused:
        check_resolvable(pair_counts(labels), FAR_KEYS)
    return str(refused.value).split(": ", 1)[1]


def test_a_split_that_resolves_every_far_is_calibrated_as_before() -> None:
    labels = np.repeat(np.arange(500), 2)  # 499,000 different-patient pairs: 1e-4 needs 100,000
    genuine, impostor = scores(labels)
    check_resolvable(pair_counts(labels), FAR_KEYS)  # calibrate would accept
    calibration = calibrate_on_validation(genuine, impostor, labels, RUN)
    assert calibration.to_dict() == Calibration.fit(genuine, impostor).to_dict()


def test_far_the_split_cannot_resolve_gets_no_threshold(caplog: pytest.LogCaptureFixture) -> None:
    labels = np.repeat(np.arange(40), 3)  # 7,020 different-patient pairs: 1e-2 yes, 1e-3 no
    genuine, impostor = scores(labels)
    with caplog.at_level(logging.WARNING, logger="models.training.train"):
        calibration = calibrate_on_validation(genuine, impostor, labels, RUN)
    assert list(calibration.thresholds) == ["1e-2"] and calibration.default_far == "1e-2"
    with pytest.raises(ValueError, match="outside the calibrated range"):
        calibration.threshold_for("1e-3")  # refused, not answered with an unmeasured threshold
    assert calibration.provenance["uncalibrated_fars"] == ["1e-3", "1e-4"]
    assert refusal(labels) in calibration.provenance["reason"]  # calibrate's words, one rule
    assert f"cxr-reid calibrate --model {RUN}" in caplog.text and "calibrated 1e-2 only" in caplog.text


def test_a_split_that_resolves_none_is_marked_provisional(caplog: pytest.LogCaptureFixture) -> None:
    labels = np.repeat(np.arange(5), 3)  # 5 patients, 90 different-patient pairs (the kind)
    genuine, impostor = scores(labels)
    with caplog.at_level(logging.WARNING, logger="models.training.train"):
        calibration = calibrate_on_validation(genuine, impostor, labels, RUN)
    reason = calibration.provenance["provisional"]
    assert refusal(labels) in reason and "at least 20 are needed" in reason
    assert "provisional" in caplog.text and f"cxr-reid calibrate --model {RUN}" in caplog.text
