"""P(same patient): a likelihood-ratio map fitted on the score scale in force, monotone, never certain,
and at its default prior (the Bayes prior of the operating point) never contradicting the decision:
a rejected pair never above 0.5, an accepted one never below, over a grid of scores, for the shipped
checkpoint as it is stored and for a site calibration on AS-norm scores; the prior is validated and
rescales the odds; ``evaluate`` prints no undefined accuracy."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_site

from app.server_process import ROOT
from models.evaluation.evaluate import format_report
from models.evaluation.metrics import evaluate_embeddings
from models.net.checkpoint import load_checkpoint
from models.net.embedder import DEFAULT_CHECKPOINT, Embedder
from models.scoring.calibration import Calibration, likelihood_ratio_bounds
from models.scoring.decide import operating_point, posterior
from models.training.site import fit_site_calibration


@pytest.fixture(scope="module")
def shipped() -> Calibration:
    return Calibration.from_dict(load_checkpoint(DEFAULT_CHECKPOINT)["calibration"])


@pytest.fixture(scope="module")
def site() -> Calibration:
    vectors, ids = synthetic_site(150, 3, noise=0.9, shared=1.0)
    return fit_site_calibration(vectors, ids, fars=("1e-2", "1e-3"), bootstrap=0, score_norm=True)


def assert_agrees_with_every_decision(calibration: Calibration, grid: np.ndarray) -> None:
    """At each calibrated FAR's Bayes prior: probability <= 0.5 below the threshold, >= 0.5 from it."""
    for far in calibration.thresholds:
        t = calibration.threshold_for(far)
        prior = calibration.bayes_prior(t)
        assert 0.0 < prior < 1.0
        scores = np.sort(np.r_[grid, t, np.nextafter(t, -np.inf), np.nextafter(t, np.inf)])
        p = calibration.probability_at_bayes_prior(scores, t)
        assert np.all(np.diff(p) >= 0), far
        rejected, accepted = scores < t, scores >= t
        assert p[rejected].max() <= 0.5 and p[accepted].min() >= 0.5, (far, p[rejected].max())
        assert calibration.probability_at_bayes_prior(t, t) == 0.5
        # the prior it names gives the same probabilities, to rounding
        assert np.allclose(calibration.probability(scores, prior=prior), p, atol=1e-12)
        assert np.all((p > 0.0) & (p < 1.0)), far  # never certain


def test_shipped_probability_agrees_with_every_decision(shipped: Calibration) -> None:
    assert shipped.source == "shipped" and shipped.score_norm is None
    assert_agrees_with_every_decision(shipped, np.linspace(-1.0, 1.0, 4001))
    t = shipped.threshold_for(None)
    # a clear reject reads as one, not as a coin toss (the 50/50 prior gave such pairs about 0.44)
    well_below = t - 0.25
    assert shipped.probability(well_below, prior=shipped.bayes_prior(t)) < 0.05
    # a stricter FAR asks for stronger evidence: its Bayes prior is smaller
    priors = [shipped.bayes_prior(shipped.threshold_for(f)) for f in ("1e-2", "1e-3", "1e-4")]
    assert priors[0] > priors[1] > priors[2]


def test_site_calibration_is_fitted_on_as_norm_scores_and_agrees(site: Calibration) -> None:
    assert site.score_norm is not None
    # AS-norm scores are standard deviations, not cosines: the map's knots live on that scale
    assert site.score_points[-1] > 1.0 and site.thresholds["1e-3"] > 1.0
    lo, hi = site.score_points[0], site.score_points[-1]
    assert_agrees_with_every_decision(site, np.linspace(lo - 2.0, hi + 2.0, 4001))


def test_the_map_is_strictly_increasing_inside_and_bounded_outside(
    shipped: Calibration, site: Calibration
) -> None:
    for calibration in (shipped, site):
        knots, llr = calibration.likelihood_ratio_knots
        assert np.all(np.diff(knots) > 0) and np.all(np.diff(llr) > 0)
        inner = np.linspace(knots[0], knots[-1], 2001)[1:-1]
        assert np.all(np.diff(calibration.log_likelihood_ratio(inner)) > 0)
        low, high = likelihood_ratio_bounds(calibration.n_genuine, calibration.n_impostor)
        assert calibration.log_likelihood_ratio(knots[0] - 1.0) == pytest.approx(math.log(low))
        assert calibration.log_likelihood_ratio(knots[-1] + 1.0) == pytest.approx(math.log(high))
    # the shipped map's own data: no staircase step left straddling its thresholds
    for far in ("1e-2", "1e-3", "1e-4"):
        t = shipped.threshold_for(far)
        assert shipped.log_likelihood_ratio(t - 1e-3) < shipped.log_likelihood_ratio(t)


def test_a_stored_staircase_is_centred() -> None:
    """Calibrations stored before the centred fit (the shipped one) keep an isotonic staircase; each
    step becomes one knot at its midpoint, so two scores on one step no longer tie."""
    calibration = Calibration(
        thresholds={"1e-2": 0.25, "1e-3": 0.35, "1e-4": 0.45},
        score_points=[0.0, 0.2, 0.2001, 0.4, 0.4001, 0.6],
        probability_points=[0.1, 0.1, 0.5, 0.5, 0.9, 0.9],
        n_genuine=100,
        n_impostor=1000,
    )
    assert calibration.probability(0.30005) == pytest.approx(0.5)
    assert calibration.probability(0.1) == pytest.approx(0.1)
    assert calibration.probability(0.2) < calibration.probability(0.3) < calibration.probability(0.4)
    assert calibration.probability(-1.0) == calibration.probability(0.1)  # flat beyond the outer knots
    assert_agrees_with_every_decision(calibration, np.linspace(-1, 1, 2001))
    # what is stored is unchanged: the JSON round trip gives the same calibration and map
    back = Calibration.from_dict(calibration.to_dict())
    assert back == calibration and back.probability(0.33) == calibration.probability(0.33)


def test_posterior_names_its_prior_and_takes_the_callers(shipped: Calibration) -> None:
    point = operating_point(shipped)
    score = point.threshold - 0.05
    default = posterior(shipped, score, point)
    assert default.prior_source == "operating_point"
    assert default.prior == pytest.approx(shipped.bayes_prior(point.threshold))
    assert default.probability < 0.5
    mine = posterior(shipped, score, point, prior=0.2)
    assert mine.prior_source == "request" and mine.prior == 0.2

    def logit(p: float) -> float:
        return math.log(p / (1 - p))

    # the caller's prior moves the log-odds by exactly the change of prior log-odds
    assert logit(mine.probability) - logit(default.probability) == pytest.approx(
        logit(0.2) - logit(default.prior)
    )
    # at a prior of one's own the probability may disagree with the decision: it answers another question
    assert posterior(shipped, score, point, prior=0.9).probability > 0.5
    for bad in (0.0, 1.0, -0.1, 1.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="prior must be a probability in"):
            posterior(shipped, score, point, prior=bad)


def test_evaluate_prints_no_undefined_accuracy() -> None:
    vectors, ids = synthetic_site(40, 3, noise=0.8)
    result = evaluate_embeddings(vectors, ids, threshold=0.5, bootstrap=0)
    result.update(model_id="m", dataset="set", split="all images", threshold=0.5, threshold_far="1e-3")
    assert "accuracy" not in result
    report = format_report(result)
    lines = {line.split()[0]: line for line in report.splitlines()[2:] if line.startswith("  ")}
    assert "accuracy" not in lines
    tar, far = result["tar_at_threshold"], result["far_at_threshold"]
    assert f"{tar:.4f}" in lines["tar_at_threshold"] and f"{far:.4f}" in lines["far_at_threshold"]
    assert f"{0.5 * (tar + 1 - far):.4f}" in lines["balanced_accuracy"]
    assert "(TAR + 1 - FAR) / 2" in lines["balanced_accuracy"]
    assert "default threshold 0.5000 (FAR 1e-3" in report


def test_model_card_states_the_shipped_default_prior(shipped: Calibration) -> None:
    card = (ROOT / "MODEL_CARD.md").read_text(encoding="utf-8")
    stated = re.search(r"the Bayes decision: ([\d.]+)% at FAR 1e-3", card)
    assert stated is not None
    assert float(stated.group(1)) == round(100 * shipped.bayes_prior(shipped.threshold_for("1e-3")), 1)


def test_cli_calibrate_states_the_bayes_prior_of_each_threshold(
    tmp_path: Path, tiny_checkpoint: Path, embedder: Embedder, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.cli import main
    from index import Gallery, NewImage

    data_dir = tmp_path / "data"
    vectors, ids = synthetic_site(80, 2, noise=1.2, seed=3, dim=embedder.dim)  # 12,720 impostor pairs
    with Gallery(data_dir, dim=embedder.dim, model_id=embedder.model_id) as gallery:
        gallery.add(vectors, [NewImage(patient_id=p) for p in ids])
    common = ["calibrate", "--data-dir", str(data_dir), "--model", str(tiny_checkpoint), "--bootstrap", "0"]
    assert main([*common, "--far", "1e-2,1e-3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    with Gallery(data_dir, dim=embedder.dim, model_id=embedder.model_id) as gallery:
        fitted = Calibration.from_dict(gallery.site_calibration())
    for far, threshold in fitted.thresholds.items():
        assert report["bayes_priors"][far] == pytest.approx(fitted.bayes_prior(threshold))
    assert report["bayes_priors"]["1e-3"] < report["bayes_priors"]["1e-2"]
    assert main([*common, "--far", "1e-2,1e-3"]) == 0
    text = capsys.readouterr().out
    prior = 100 * fitted.bayes_prior(fitted.thresholds["1e-3"])
    assert re.search(rf"FAR 1e-3: threshold .*Bayes prior {prior:.3g}%", text) is not None
    assert ">= 50% exactly when the pair is accepted" in text


def test_the_review_page_never_rounds_a_doubt_away() -> None:
    from app.api.routers.review import share

    assert share(0.99998) == "99.998%" and share(0.00012) == "0.01%" and share(0.000012) == "0.001%"
    assert share(0.5) == "50.0%" and share(0.013405) == "1.3%" and share(None) == "n/a"
    assert share(1 - 1e-9) == "> 99.9999%" and share(1e-9) == "< 0.0001%"
