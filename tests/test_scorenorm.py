"""AS-norm: leave-pair-out statistics, the raw floors range searches rely on, serialisation, and a
site calibration whose promise holds in normalised units."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import synthetic_site

from models.evaluation.metrics import pair_scores
from models.scoring.scorenorm import MAX_PER_PATIENT, UNKNOWN, ScoreNorm, choose_cohort, patient_key
from models.training.site import fit_site_calibration, split_half


def test_cohort_caps_each_patient_and_the_size() -> None:
    keys = [patient_key(f"p{i // 30}") for i in range(300)]  # 10 patients x 30 images
    chosen = choose_cohort(keys, size=50)
    assert len(chosen) == 50
    picked = [keys[i] for i in chosen]
    assert max(picked.count(k) for k in set(picked)) <= MAX_PER_PATIENT
    assert patient_key("p1") != patient_key("p2") and patient_key(None) == ""


def test_statistics_leave_both_patients_of_a_pair_out() -> None:
    vectors, ids = synthetic_site(30, 4, noise=0.4, dim=24)
    keys = [patient_key(p) for p in ids]
    norm = ScoreNorm(vectors, keys, top_k=5)
    side = norm.neighbours(vectors[:1])
    assert np.all(side.scores[0, :-1] >= side.scores[0, 1:])  # best first, itself left out
    assert side.codes[0, 0] == norm.codes([keys[1]])[0]  # the nearest is its own patient's image
    mine = norm.codes([keys[0]])
    kept, _ = norm.side_stats(side, np.array([0]), mine, np.array([UNKNOWN]))
    plain, _ = norm.side_stats(side, np.array([0]), np.array([UNKNOWN]), np.array([UNKNOWN]))
    assert kept[0] < plain[0]  # its own patient's images are not impostors: mu falls without them
    # normalised scores are the formula, pair by pair
    raw = np.array([float(vectors[0] @ vectors[5])])
    out = norm.normalise_pairs(
        raw, side, np.array([0]), mine, norm.neighbours(vectors[5:6]), np.array([0]), norm.codes([keys[5]])
    )
    mu_a, sd_a = norm.side_stats(side, np.array([0]), mine, norm.codes([keys[5]]))
    mu_b, sd_b = norm.side_stats(norm.neighbours(vectors[5:6]), np.array([0]), mine, norm.codes([keys[5]]))
    assert out[0] == pytest.approx(0.5 * ((raw[0] - mu_a[0]) / sd_a[0] + (raw[0] - mu_b[0]) / sd_b[0]))


@pytest.mark.parametrize("threshold", [-0.5, 0.5, 2.0, 3.5])
def test_raw_floors_never_miss_a_pair(threshold: float) -> None:
    vectors, ids = synthetic_site(60, 3, noise=0.7, seed=2, dim=24)
    keys = [patient_key(p) for p in ids]
    cohort = choose_cohort(keys, size=80)
    norm = ScoreNorm(vectors[cohort], [keys[i] for i in cohort], top_k=10)
    labels = np.unique(ids, return_inverse=True)[1]
    g, imp, gp, ip = pair_scores(vectors, labels)
    raw, pairs = np.concatenate([g, imp]), np.concatenate([gp, ip])
    normed = norm.normalise_within(vectors, keys, raw, pairs)
    bounds = norm.bounds(norm.neighbours(vectors))
    floor = ScoreNorm.raw_floor(threshold, bounds)
    assert not np.any((normed >= threshold) & (raw < floor))
    per_image = threshold * bounds[:, 1 if threshold >= 0 else 2] + bounds[:, 0]
    assert not np.any(
        (normed >= threshold) & (raw < np.minimum(per_image[pairs[:, 0]], per_image[pairs[:, 1]]))
    )


def test_serialisation_keeps_the_cohort_and_no_patient_id() -> None:
    vectors, ids = synthetic_site(10, 2, noise=0.3, dim=24)
    norm = ScoreNorm(vectors, [patient_key(p) for p in ids], top_k=4)
    data = norm.to_dict()
    assert "p1" not in str(data["cohort_keys"])
    again = ScoreNorm.from_dict(data)
    assert again.top_k == 4 and np.allclose(again.cohort, norm.cohort, atol=1e-3)
    with pytest.raises(ValueError, match="unknown score normalisation"):
        ScoreNorm.from_dict({**data, "method": "z-norm"})


def test_as_norm_raises_tar_at_a_site_whose_images_look_alike() -> None:
    """At a site where every image leans one way, AS-norm separates patients better and a site
    calibration in its units still delivers the FAR it promises."""
    vectors, ids = synthetic_site(160, 3, noise=0.9, seed=5, shared=1.5, dim=24)
    result = split_half(vectors, ids, repeats=2, snorm_top_k=20)
    row = result["fars"]["1e-2"]
    assert row["auc_snorm"]["mean"] >= row["auc_raw"]["mean"] - 0.01
    assert row["snorm_far"]["mean"] <= 2 * 1e-2
    calibration = fit_site_calibration(vectors, ids, fars=("1e-2", "1e-3"), bootstrap=0)
    assert calibration.score_norm is not None and calibration.provenance["score_norm"].startswith("as-norm")
