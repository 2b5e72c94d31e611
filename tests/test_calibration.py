"""Calibration: thresholds keep the FAR they claim, the probability map is a proper monotone map,
and the JSON form round-trips (checkpoints carry it)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from models.scoring.calibration import (
    FAR_KEYS,
    Calibration,
    _thin_monotone,
    far_curve_grid,
    likelihood_ratio_bounds,
)


def _scores(n_gen: int, n_imp: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    g = np.clip(rng.normal(0.55, 0.15, n_gen), -1, 1).astype(np.float32)
    imp = np.clip(rng.normal(0.0, 0.12, n_imp), -1, 1).astype(np.float32)
    return g, imp


@pytest.fixture(scope="module")
def fitted() -> tuple[Calibration, np.ndarray, np.ndarray]:
    g, imp = _scores(3000, 50_000)
    return Calibration.fit(g, imp), g, imp


def test_thresholds_give_the_far_they_claim(fitted):
    cal, _, imp = fitted
    assert set(cal.thresholds) == set(FAR_KEYS)
    assert cal.default_far == "1e-3"
    assert cal.n_impostor == imp.size and cal.n_genuine == 3000
    for key, t in cal.thresholds.items():
        far = float(key)
        observed = np.mean(imp >= t)
        assert observed <= far
        # tight: continuous scores, so exactly floor(far * n) impostors are accepted
        assert observed == pytest.approx(math.floor(far * imp.size + 1e-9) / imp.size)
    # stricter FAR, higher threshold
    assert cal.thresholds["1e-4"] > cal.thresholds["1e-3"] > cal.thresholds["1e-2"]
    # every point on the stored curve keeps its FAR too
    for far, t in zip(cal.far_points, cal.far_thresholds, strict=True):
        assert np.mean(imp >= t) <= far


def test_too_few_impostors_still_gives_thresholds_and_says_so():
    g, imp = _scores(50, 400)
    cal = Calibration.fit(g, imp)
    assert cal.n_impostor == 400
    assert cal.min_resolvable_far == pytest.approx(1 / 400)
    # FAR 1e-3 and 1e-4 cannot be measured on 400 impostors: just above the highest impostor score
    for key in ("1e-3", "1e-4"):
        assert cal.thresholds[key] > imp.max()
        assert cal.thresholds[key] - imp.max() < 1e-6
        assert np.mean(imp >= cal.thresholds[key]) == 0.0


def test_ties_are_never_split():
    imp = np.array([0.1] * 50 + [0.5] * 10 + [0.2] * 940, dtype=np.float64)
    cal = Calibration.fit(np.array([0.9, 0.8]), imp)
    # FAR 1e-2 allows 10 of 1000 impostors: exactly the tied block at 0.5 -> must be accepted whole or not
    assert np.mean(imp >= cal.thresholds["1e-2"]) <= 1e-2
    assert np.mean(imp >= cal.thresholds["1e-3"]) == 0.0


def test_probability_is_monotone_and_bounded(fitted):
    cal, g, imp = fitted
    s = np.linspace(-1.5, 1.5, 2001)
    p = cal.probability(s)
    assert isinstance(p, np.ndarray) and p.shape == s.shape
    assert np.all((p >= 0) & (p <= 1))
    assert np.all(np.diff(p) >= 0)
    # strictly increasing between the outer knots: no staircase ties a pair below a threshold with one above
    inner = (s > cal.score_points[0]) & (s < cal.score_points[-1])
    assert np.all(np.diff(p[inner]) > 0)
    # never certain: the likelihood ratio is bounded by half a pair on the side that saw none
    low, high = likelihood_ratio_bounds(cal.n_genuine, cal.n_impostor)
    assert cal.probability(-1.0) == pytest.approx(low / (1 + low))
    assert cal.probability(1.0) == pytest.approx(high / (1 + high))
    assert 0.0 < cal.probability(-1.0) < 1e-3 and 0.999 < cal.probability(1.0) < 1.0
    assert isinstance(cal.probability(0.3), float)
    # class balanced: mean P over genuine high, over impostors low
    assert np.mean(cal.probability(g)) > 0.9 > 0.1 > np.mean(cal.probability(imp))
    assert cal.prior == 0.5


def test_probability_map_is_thinned_without_losing_shape():
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(3)
    g = rng.normal(0.3, 0.2, 20_000)  # heavy overlap: many isotonic steps
    imp = rng.normal(0.0, 0.2, 60_000)
    cal = Calibration.fit(g, imp)
    x = np.r_[g, imp]
    y = np.r_[np.ones(g.size), np.zeros(imp.size)]
    w = np.r_[np.full(g.size, 0.5 / g.size), np.full(imp.size, 0.5 / imp.size)]
    iso = IsotonicRegression(out_of_bounds="clip").fit(x, y, sample_weight=w)
    assert len(cal.score_points) <= 202
    grid = np.linspace(x.min(), x.max(), 5001)
    assert np.abs(iso.predict(grid) - cal.probability(grid)).max() < 0.03

    # the thinning itself, on a curve with many more points and a few sharp jumps
    xs = np.sort(rng.uniform(-1, 1, 5000))
    ys = np.clip(np.cumsum(rng.exponential(1.0, 5000)) / 5000 + 0.2 * (xs > 0.1) + 0.1 * (xs > 0.5), 0, None)
    ys /= ys[-1]
    tx, ty = _thin_monotone(xs, ys, 200)
    assert len(tx) <= 202 and tx[0] == xs[0] and tx[-1] == xs[-1]
    assert np.all(np.diff(tx) > 0) and np.all(np.diff(ty) >= 0)
    assert np.abs(np.interp(xs, tx, ty) - ys).max() < 0.03


def test_prior_rescales_the_odds(fitted):
    cal = fitted[0]
    s = np.array([0.2, 0.3, 0.35, 0.4])
    p = cal.probability(s)
    assert np.allclose(cal.probability(s, prior=0.5), p)
    q = cal.probability(s, prior=0.01)
    assert np.all(q <= p)
    inner = (p > 0) & (p < 1)
    odds_ratio = (q[inner] / (1 - q[inner])) / (p[inner] / (1 - p[inner]))
    assert np.allclose(odds_ratio, 0.01 / 0.99)


def test_round_trip_through_json(fitted):
    cal = fitted[0]
    d = json.loads(json.dumps(cal.to_dict(), allow_nan=False))
    back = Calibration.from_dict(d)
    assert back == cal
    s = np.linspace(-1, 1, 101)
    assert np.array_equal(back.probability(s), cal.probability(s))
    for far in (None, "1e-2", 3e-3, 0.2):
        assert back.threshold_for(far) == cal.threshold_for(far)
    # unknown keys from a newer writer are ignored; a minimal dict still loads
    d["something_new"] = 1
    assert Calibration.from_dict(d) == cal
    minimal = Calibration.from_dict({"thresholds": {"1e-2": 0.3, "1e-3": 0.4, "1e-4": 0.5}})
    assert minimal.threshold_for() == 0.4
    assert 0.4 < minimal.threshold_for(5e-4) < 0.5
    with pytest.raises(ValueError):
        minimal.probability(0.3)


def test_threshold_for_accepts_keys_floats_and_none(fitted):
    cal = fitted[0]
    assert cal.threshold_for() == cal.threshold_for(None) == cal.thresholds["1e-3"]
    for key in FAR_KEYS:
        assert cal.threshold_for(key) == cal.threshold_for(float(key)) == cal.thresholds[key]
    assert cal.threshold_for("5e-3") == cal.threshold_for(5e-3)
    # between keyed values, monotone in the FAR
    t3, t2, t4 = cal.thresholds["1e-3"], cal.thresholds["1e-2"], cal.thresholds["1e-4"]
    assert t3 > cal.threshold_for(5e-3) > t2
    assert t4 > cal.threshold_for(3e-4) > t3
    fars = np.logspace(-4, -1, 40)
    ts = [cal.threshold_for(f) for f in fars]
    assert np.all(np.diff(ts) <= 0)
    for bad in (0.0, 1.0, -1e-3, math.nan, 0.9, 1e-7, "often"):
        with pytest.raises(ValueError):
            cal.threshold_for(bad)


def test_far_at_inverts_threshold_for(fitted):
    cal, _, imp = fitted
    for far in (2e-4, 1e-3, 4e-3, 1e-2, 0.05, 0.3):
        assert cal.far_at(cal.threshold_for(far)) == pytest.approx(far, rel=1e-6)
    for t in np.linspace(cal.far_thresholds[-1], cal.thresholds["1e-4"], 15):
        assert cal.threshold_for(cal.far_at(t)) == pytest.approx(t, abs=1e-9)
    # the FAR it stands for is close to what the impostor set says
    t = 0.3
    assert cal.far_at(t) == pytest.approx(np.mean(imp >= t), rel=0.3)
    # clamped at both ends of the curve
    grid = far_curve_grid()
    assert cal.far_at(1.0) == pytest.approx(grid[0])
    assert cal.far_at(-1.0) == pytest.approx(grid[-1])


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError):
        Calibration.fit(np.array([]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError):
        Calibration.fit(np.array([0.5, np.nan]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError):
        Calibration(thresholds={"1e-2": 0.3}, default_far="1e-3")
