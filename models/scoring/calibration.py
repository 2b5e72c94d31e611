"""Score calibration: cosine-score thresholds at fixed false-accept rates and a score -> probability map.

A verification service has to answer two questions about a similarity score: "is it above the
operating threshold?" and "how likely is it the same patient?". Both are fitted here on held-out
genuine (same patient) and impostor (different patient) pair scores and stored as plain numbers so
a checkpoint can carry them as JSON.

Thresholds. The threshold for a false-accept rate (FAR) f is chosen from the impostor scores so that
the fraction of impostor scores ``>= t`` is at most f: with the impostor scores sorted high to low,
at most ``k = floor(f * n_impostor)`` of them may be accepted, so ``t`` is placed halfway between
the (k+1)-th highest impostor score and the next distinct higher score (above the maximum impostor
score when ``k = 0``). Halfway, not just above, keeps the stated FAR when the same pair is scored
again with slightly different float rounding (numpy against FAISS). A FAR below
``1 / n_impostor`` cannot be measured on the calibration set; its threshold is still computed (it
lands just above the highest impostor score) and ``n_impostor`` is recorded so consumers can tell
(see :attr:`Calibration.min_resolvable_far`).

Probability. ``P(same patient | score)`` comes from a likelihood-ratio map LR(s) = p(s | same) /
p(s | different), fitted on the same genuine and impostor scores, on the scale decisions are made
on (raw cosines, or AS-norm when the calibration carries a cohort). The fit is a class-balanced
isotonic regression of "same patient" on the score, centred (Oron & Flournoy 2017, centred isotonic
regression): each pooled block becomes one knot at its weighted mean score, so the map is strictly
increasing between knots instead of a staircase whose steps would tie a pair below a threshold with
one above it. Its value at 50/50 is LR / (1 + LR); log LR is interpolated linearly between knots and
held flat beyond the outer ones. LR is bounded by what the pairs can show: a stretch holding no
impostor pair supports at most ``(G + 0.5) / (G + 1) / (0.5 / (I + 1))`` (half a pair, not zero;
G genuine and I impostor pairs), and likewise below, so no score reads "certainly the same patient".

Prior. The posterior at prior ``pi`` is ``LR * pi / (LR * pi + 1 - pi)``. A threshold ``t`` is the
Bayes decision (equal costs for a false accept and a false reject) at exactly one prior,
:meth:`Calibration.bayes_prior`: ``1 / (1 + LR(t))``. The service states the prior of every
probability it gives and, unless the caller names one (a site's misfile base rate, say), uses the
Bayes prior of the operating point in force, so the probability is at least 0.5 exactly where the
score reaches the threshold. At another prior the probability and the FAR-based decision answer
different questions (how likely is this pair, against: does the score reach a line that admits
that share of different-patient pairs).

Stored calibrations from before the centred fit (the shipped checkpoint's among them) keep the
isotonic staircase in ``probability_points``; :meth:`Calibration.__post_init__` centres it the same
way (each run of equal values becomes one knot at its midpoint) and applies the same bounds, so
every calibration answers through one strictly increasing map, derived from what it stores.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

FAR_KEYS: tuple[str, ...] = ("1e-2", "1e-3", "1e-4")
DEFAULT_FAR = "1e-3"
MAX_PROBABILITY_POINTS = 200
# FAR curve: ten points per decade from 1e-5 to 10**-0.4, then 0.5. It contains 1e-4, 1e-3 and 1e-2
# exactly (same arithmetic as the keyed thresholds), so threshold_for(1e-3) == threshold_for("1e-3").
FAR_CURVE_MIN = 1e-5
FAR_CURVE_MAX = 0.5
FORMAT_VERSION = 1


def far_curve_grid() -> np.ndarray:
    """The FARs at which the compact FAR curve is stored (log-spaced, 1e-5 .. 0.5)."""
    decades = [10.0 ** (e / 10.0) for e in range(-50, -3)]
    return np.array([*decades, FAR_CURVE_MAX], dtype=np.float64)


def check_prior(prior: float) -> float:
    """``prior`` as a float in (0, 1), else ValueError saying so."""
    try:
        value = float(prior)
    except (TypeError, ValueError):
        raise ValueError(f"prior must be a probability in (0, 1), got {prior!r}") from None
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise ValueError(f"prior must be a probability in (0, 1), got {prior!r}")
    return value


def _sigmoid(z: np.ndarray) -> np.ndarray:
    from scipy.special import expit

    return np.asarray(expit(z), dtype=np.float64)


def _as_scores(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"{name}: need at least one score")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: scores must be finite")
    return a


def _just_above(v: float) -> float:
    """The smallest float32 value above ``v``: scores are usually float32 (embeddings, FAISS)."""
    return float(np.nextafter(np.float32(v), np.float32(np.inf)))


def thresholds_at_fars(impostor_sorted: np.ndarray, fars: np.ndarray) -> np.ndarray:
    """Thresholds t with fraction(impostor >= t) <= far, from impostor scores sorted ascending.

    Vectorised over ``fars``; see the module docstring for the rule.
    """
    asc = impostor_sorted
    n = asc.size
    # floor(f * n) with a little slack so 1e-3 * 1000 counts as 1 despite rounding
    k = np.floor(np.asarray(fars, dtype=np.float64) * n + 1e-9).astype(np.int64)
    k = np.clip(k, 0, n - 1)
    v = asc[n - 1 - k]  # the (k+1)-th highest impostor score: must be rejected
    nxt = np.searchsorted(asc, v, side="right")  # first index of a strictly higher score
    out = np.empty(v.shape, dtype=np.float64)
    for i, (vi, ni) in enumerate(zip(v, nxt, strict=True)):
        if ni < n:
            t = 0.5 * (vi + asc[ni])
            out[i] = t if t > vi else float(np.nextafter(vi, np.inf))
        else:
            out[i] = _just_above(vi)
    return out


def _thin_monotone(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep at most ~max_points of a monotone piecewise-linear curve, keeping its steps.

    Points are kept at evenly spaced levels of y (with the point before each, so a jump stays a
    jump) and at evenly spaced levels of x, plus both ends.
    """
    n = x.size
    if n <= max_points:
        return x, y
    n_levels = max(2, (max_points - 2) // 3)
    y_levels = np.linspace(y[0], y[-1], n_levels)
    iy = np.searchsorted(y, y_levels, side="left")
    x_levels = np.linspace(x[0], x[-1], n_levels)
    ix = np.searchsorted(x, x_levels, side="left")
    keep = np.unique(np.concatenate([[0, n - 1], iy, iy - 1, ix]).clip(0, n - 1))
    return x[keep], y[keep]


def likelihood_ratio_bounds(n_genuine: int, n_impostor: int) -> tuple[float, float]:
    """The smallest and largest likelihood ratio ``G`` genuine and ``I`` impostor pairs can support.

    A stretch of scores holding no impostor pair is counted as holding half of one (and likewise for
    genuine pairs), so a finite sample never yields LR 0 or infinity: a probability of exactly 0 or 1
    would claim more than any calibration set can show.
    """
    g, i = max(int(n_genuine), 1), max(int(n_impostor), 1)
    high = (g + 0.5) / (g + 1) / (0.5 / (i + 1))
    low = (0.5 / (g + 1)) / ((i + 0.5) / (i + 1))
    return low, high


def _collapse_runs(
    x: np.ndarray, p: np.ndarray, weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One knot per run of equal ``p``: at the run's weighted mean ``x`` (its midpoint without
    weights), so a staircase becomes a strictly increasing curve through the middle of each step."""
    starts = np.r_[0, np.flatnonzero(np.diff(p) != 0) + 1]
    if weight is None:
        ends = np.r_[starts[1:], p.size] - 1
        return 0.5 * (x[starts] + x[ends]), p[starts]
    sums = np.add.reduceat(weight * x, starts)
    return sums / np.add.reduceat(weight, starts), p[starts]


def centred_isotonic(
    genuine: np.ndarray, impostor: np.ndarray, *, bounds: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Knots (score, P(same) at 50/50) of the class-balanced centred isotonic fit, bounded so the
    likelihood ratio stays within ``bounds`` (see the module docstring)."""
    from sklearn.isotonic import IsotonicRegression

    x = np.concatenate([genuine, impostor])
    y = np.concatenate([np.ones(genuine.size), np.zeros(impostor.size)])
    w = np.concatenate(
        [np.full(genuine.size, 0.5 / genuine.size), np.full(impostor.size, 0.5 / impostor.size)]
    )
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    iso.fit(x, y, sample_weight=w * x.size)
    order = np.argsort(x, kind="stable")
    fitted = _bounded(np.asarray(iso.predict(x[order]), dtype=np.float64), bounds)
    return _collapse_runs(x[order], fitted, w[order])


def _bounded(p: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """P(same) at 50/50 held to the likelihood-ratio ``bounds`` (LR = p / (1 - p) at 50/50)."""
    low, high = bounds
    return np.clip(p, low / (1.0 + low), high / (1.0 + high))


@dataclass
class Calibration:
    """Thresholds at fixed FARs and the score -> probability map of one model.

    ``thresholds`` holds the headline operating points (keys "1e-2", "1e-3", "1e-4"); ``far_points``
    / ``far_thresholds`` a compact FAR curve so any FAR in [1e-5, 0.5] maps to a threshold (and any
    threshold to the FAR it stands for). ``score_points`` / ``probability_points`` are the knots of
    the score -> P(same patient) map at ``prior`` (0.5: equal odds), from which the likelihood-ratio
    map every probability goes through is derived (:meth:`log_likelihood_ratio`).
    """

    thresholds: dict[str, float]
    default_far: str = DEFAULT_FAR
    score_points: list[float] = field(default_factory=list)
    probability_points: list[float] = field(default_factory=list)
    far_points: list[float] = field(default_factory=list)
    far_thresholds: list[float] = field(default_factory=list)
    n_genuine: int = 0
    n_impostor: int = 0
    prior: float = 0.5
    #: where the numbers come from: "shipped" (fitted in training on the model's own validation
    #: patients) or "site" (the user's labelled images: ``cxr-reid calibrate``, POST /calibration)
    source: str = "shipped"
    #: what it was fitted on and when: images, patients, date, manifest digest or gallery, the
    #: patient-bootstrap interval of each threshold (``threshold_ci``); free-form JSON values
    provenance: dict[str, Any] = field(default_factory=dict)
    #: when set, thresholds and the probability map are in AS-norm units: scores are normalised
    #: against this cohort first (``models.scoring.scorenorm.ScoreNorm.to_dict()``); None = raw cosines
    score_norm: dict[str, Any] | None = None
    #: the likelihood-ratio map derived from the stored knots (scores, log LR): see the module docstring
    _lr_scores: np.ndarray = field(init=False, repr=False, compare=False)
    _lr_log: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.thresholds = {str(k): float(v) for k, v in self.thresholds.items()}
        if self.default_far not in self.thresholds:
            raise ValueError(f"default_far {self.default_far!r} is not one of {sorted(self.thresholds)}")
        if len(self.score_points) != len(self.probability_points):
            raise ValueError("score_points and probability_points differ in length")
        if len(self.far_points) != len(self.far_thresholds):
            raise ValueError("far_points and far_thresholds differ in length")
        self.prior = check_prior(self.prior)
        self.score_points = [float(v) for v in self.score_points]
        self.probability_points = [float(v) for v in self.probability_points]
        self.far_points = [float(v) for v in self.far_points]
        self.far_thresholds = [float(v) for v in self.far_thresholds]
        if not self.far_points:
            # no curve stored (a hand-made calibration): use the keyed thresholds as the curve
            items = sorted((float(k), v) for k, v in self.thresholds.items())
            self.far_points = [f for f, _ in items]
            self.far_thresholds = [t for _, t in items]
        if np.any(np.diff(self.far_points) <= 0):
            raise ValueError("far_points must increase")
        if np.any(np.diff(self.far_thresholds) > 0):
            raise ValueError("far_thresholds must not increase with the FAR")
        self._derive_likelihood_ratio()

    def _derive_likelihood_ratio(self) -> None:
        """The strictly increasing log-LR knots behind every probability (module docstring)."""
        x = np.asarray(self.score_points, dtype=np.float64)
        p = np.asarray(self.probability_points, dtype=np.float64)
        if x.size and (np.any(np.diff(x) < 0) or np.any(np.diff(p) < 0)):
            raise ValueError("score_points and probability_points must not decrease")
        if x.size == 0:
            self._lr_scores, self._lr_log = x, p
            return
        bounds = likelihood_ratio_bounds(self.n_genuine, self.n_impostor)
        # the knots hold P(same) at ``prior``; at 50/50 they are LR / (1 + LR)
        odds = self.prior / (1.0 - self.prior)
        x, at_half = _collapse_runs(x, _bounded(p / (p + (1.0 - p) * odds), bounds))
        self._lr_scores = x
        self._lr_log = np.log(at_half) - np.log1p(-at_half)

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        genuine: np.ndarray,
        impostor: np.ndarray,
        *,
        default_far: str = DEFAULT_FAR,
        max_points: int = MAX_PROBABILITY_POINTS,
        fars: tuple[str, ...] = FAR_KEYS,
        min_far: float = 0.0,
        source: str = "shipped",
        provenance: dict[str, Any] | None = None,
        score_norm: dict[str, Any] | None = None,
    ) -> Calibration:
        """Fit thresholds and the probability map on held-out genuine and impostor pair scores.

        ``fars`` are the headline operating points to store; ``min_far`` cuts the FAR curve below
        the smallest FAR the data resolves, so a request for a lower FAR is refused instead of
        answered with an unmeasured threshold (site calibration sets it; the shipped validation
        calibration keeps the whole curve and records ``n_impostor``).
        """
        g = _as_scores(genuine, "genuine")
        imp = _as_scores(impostor, "impostor")
        asc = np.sort(imp)
        keyed = thresholds_at_fars(asc, np.array([float(k) for k in fars]))
        thresholds = {k: float(t) for k, t in zip(fars, keyed, strict=True)}
        grid = far_curve_grid()
        grid = grid[grid >= min_far * (1 - 1e-9)]
        curve = thresholds_at_fars(asc, grid)
        for k in fars:
            if float(k) * imp.size < 1.0:
                logger.warning(
                    "calibration: FAR %s needs >= %d impostor pairs to be measured, have %d; "
                    "its threshold is just above the highest impostor score",
                    k,
                    math.ceil(1.0 / float(k)),
                    imp.size,
                )

        # centred, class-balanced isotonic fit: P(same | score) at 50/50, strictly increasing
        xs, ys = centred_isotonic(g, imp, bounds=likelihood_ratio_bounds(g.size, imp.size))
        xs, ys = _thin_monotone(xs, ys, max_points)
        return cls(
            thresholds=thresholds,
            default_far=default_far,
            score_points=xs.tolist(),
            probability_points=ys.tolist(),
            far_points=grid.tolist(),
            far_thresholds=curve.tolist(),
            n_genuine=int(g.size),
            n_impostor=int(imp.size),
            prior=0.5,
            source=source,
            provenance=dict(provenance or {}),
            score_norm=score_norm,
        )

    # ------------------------------------------------------------------ use
    @property
    def min_resolvable_far(self) -> float:
        """The smallest FAR the calibration set can measure (1 / n_impostor); inf when unknown."""
        return 1.0 / self.n_impostor if self.n_impostor > 0 else math.inf

    def threshold_for(self, far: float | str | None = None) -> float:
        """The score threshold for a FAR: None = default, a key ("1e-3"), or any FAR in the curve range.

        Keyed FARs return the stored headline thresholds; other FARs are interpolated on the FAR
        curve linearly in log10(FAR). Raises ValueError outside the stored range.
        """
        if far is None:
            return self.thresholds[self.default_far]
        if isinstance(far, str):
            key = far.strip()
            if key in self.thresholds:
                return self.thresholds[key]
            try:
                far = float(key)
            except ValueError:
                raise ValueError(f"not a FAR: {far!r}") from None
        f = float(far)
        if not (math.isfinite(f) and 0.0 < f < 1.0):
            raise ValueError(f"FAR must be in (0, 1), got {far!r}")
        for key, t in self.thresholds.items():
            if math.isclose(f, float(key), rel_tol=1e-9):
                return t
        lo, hi = self.far_points[0], self.far_points[-1]
        if not (lo * (1 - 1e-12) <= f <= hi * (1 + 1e-12)):
            raise ValueError(f"FAR {f:g} is outside the calibrated range [{lo:g}, {hi:g}]")
        return float(np.interp(math.log10(f), np.log10(self.far_points), self.far_thresholds))

    def far_at(self, threshold: float) -> float:
        """The FAR a threshold stands for: the smallest FAR on the curve whose threshold is <= it.

        The inverse of :meth:`threshold_for` (log-linear between curve points). Clamped to the curve's
        range: a threshold above every curve threshold returns the smallest stored FAR, one below
        every curve threshold the largest. Values below :attr:`min_resolvable_far` are not measured.
        """
        t = float(threshold)
        if not math.isfinite(t):
            raise ValueError("threshold must be finite")
        ts = np.asarray(self.far_thresholds, dtype=np.float64)  # non-increasing
        lf = np.log10(np.asarray(self.far_points, dtype=np.float64))
        i = int(np.searchsorted(-ts, -t, side="left"))  # first curve point with threshold <= t
        if i == 0:
            return float(self.far_points[0])
        if i >= ts.size:
            return float(self.far_points[-1])
        t0, t1 = ts[i - 1], ts[i]  # t0 > t >= t1
        a = (t0 - t) / (t0 - t1)
        return float(10.0 ** (lf[i - 1] + a * (lf[i] - lf[i - 1])))

    @property
    def likelihood_ratio_knots(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, log LR) of the map's knots: strictly increasing in both; flat beyond the outer ones."""
        return self._lr_scores.copy(), self._lr_log.copy()

    def log_likelihood_ratio(self, score: float | np.ndarray) -> float | np.ndarray:
        """log p(score | same patient) / p(score | different patients), vectorised: non-decreasing in
        the score, strictly increasing between the outer knots, bounded by the calibration's pairs."""
        if not self.score_points:
            raise ValueError("this calibration has no score -> probability map")
        out = np.interp(np.asarray(score, dtype=np.float64), self._lr_scores, self._lr_log)
        return float(out) if out.ndim == 0 else out

    def bayes_prior(self, threshold: float) -> float:
        """The prior P(same patient) at which accepting pairs that score ``>= threshold`` is the Bayes
        decision (equal costs): the posterior is exactly 0.5 at the threshold."""
        return float(_sigmoid(-np.asarray(self.log_likelihood_ratio(threshold))))

    def probability_at_bayes_prior(self, score: float | np.ndarray, threshold: float) -> float | np.ndarray:
        """P(same patient | score) at :meth:`bayes_prior` of ``threshold``, computed as LR(score) /
        (LR(score) + LR(threshold)) so that rounding never lifts a score below the threshold above 0.5
        (nor drops one at or above it below 0.5)."""
        z = np.asarray(self.log_likelihood_ratio(score)) - float(self.log_likelihood_ratio(threshold))
        p = _sigmoid(z)
        return float(p) if p.ndim == 0 else p

    def probability(self, score: float | np.ndarray, prior: float | None = None) -> float | np.ndarray:
        """P(same patient | score), vectorised, at ``prior`` (default ``self.prior``, 50/50):
        the likelihood ratio times the prior odds, as a probability."""
        prior = self.prior if prior is None else check_prior(prior)
        z = np.asarray(self.log_likelihood_ratio(score)) + math.log(prior / (1.0 - prior))
        p = _sigmoid(z)
        return float(p) if p.ndim == 0 else p

    def summary(self) -> dict[str, Any]:
        """Which calibration this is, in a few fields (service responses, logs, reports)."""
        p = self.provenance
        return {
            "source": self.source,
            "genuine_pairs": int(self.n_genuine),
            "impostor_pairs": int(self.n_impostor),
            "patients": p.get("patients"),
            "images": p.get("images"),
            "fitted_at": p.get("fitted_at"),
            "calibration_id": p.get("calibration_id"),
            "fars": sorted(self.thresholds, key=float, reverse=True),
            "score_norm": p.get("score_norm"),
        }

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (floats, lists, str)."""
        return {
            "format_version": FORMAT_VERSION,
            "thresholds": {k: float(v) for k, v in self.thresholds.items()},
            "default_far": self.default_far,
            "score_points": [float(v) for v in self.score_points],
            "probability_points": [float(v) for v in self.probability_points],
            "far_points": [float(v) for v in self.far_points],
            "far_thresholds": [float(v) for v in self.far_thresholds],
            "n_genuine": int(self.n_genuine),
            "n_impostor": int(self.n_impostor),
            "prior": float(self.prior),
            "source": self.source,
            "provenance": self.provenance,
            "score_norm": self.score_norm,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        """Inverse of :meth:`to_dict`; tolerates missing optional keys and ignores unknown ones."""
        known = {
            "thresholds",
            "default_far",
            "score_points",
            "probability_points",
            "far_points",
            "far_thresholds",
            "n_genuine",
            "n_impostor",
            "prior",
            "source",
            "provenance",
            "score_norm",
        }
        unknown = set(d) - known - {"format_version"}
        if unknown:
            logger.debug("Calibration.from_dict: ignoring keys %s", sorted(unknown))
        if "thresholds" not in d:
            raise ValueError("calibration dict has no 'thresholds'")
        return cls(**{k: v for k, v in d.items() if k in known})
