"""Vectors -> scores -> decisions, once for everyone who decides.

The service (/verify, /search, /images, /duplicates), the dataset audit and the risk report all
score pairs with :func:`pair_cosines` (float64, row by row) and, where the calibration carries an
AS-norm cohort, with :class:`PairScorer`; they all turn a score into a decision with
:func:`is_same_patient` at an :class:`OperatingPoint` from :func:`operating_point`. "The same scores
the service decides on" therefore holds by construction, not by copying.

Errors are ``ValueError`` with a message a person can act on; the service and the CLI put them in
their own words (``far: ...``, ``--far ...``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.scoring.calibration import Calibration, check_prior
from models.scoring.scorenorm import ScoreNorm, patient_key

#: Rows of vectors multiplied at once: bounds the float64 copies a long list of pairs makes.
PAIR_CHUNK = 65_536


def parse_fars(text: str | Sequence[str]) -> list[str]:
    """ "1e-2,1e-3" (or a list of such strings) -> ["1e-2", "1e-3"]; each a number in (0, 1), kept
    as written because calibrations are keyed by the text of the FAR."""
    items = text.split(",") if isinstance(text, str) else list(text)
    fars = [item.strip() for item in items if item.strip()]
    if not fars:
        raise ValueError("give one or more false-accept rates, e.g. 1e-2,1e-3")
    for far in fars:
        try:
            value = float(far)
        except ValueError:
            raise ValueError(f"{far!r} is not a number") from None
        if not 0.0 < value < 1.0:
            raise ValueError(f"{far} is not in (0, 1)")
    return fars


def pair_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine scores of row pairs of unit vectors (``a[i]`` with ``b[i]``; one side may be a single
    row), in float64, clipped to [-1, 1].

    An elementwise product summed along the row, not a matrix product: a BLAS product rounds a row
    differently with the number of rows, and a pair must get one score, to the last bit, whether it
    is scored alone (/verify) or among many (/search, the audit, the risk report).
    """
    left = np.asarray(a)
    right = np.asarray(b)
    left = left.reshape(-1, left.shape[-1])
    right = right.reshape(-1, right.shape[-1])
    n = max(len(left), len(right))
    out = np.empty(n)
    for start in range(0, n, PAIR_CHUNK):
        part = slice(start, start + PAIR_CHUNK)
        x = (left if len(left) == 1 else left[part]).astype(np.float64)
        y = (right if len(right) == 1 else right[part]).astype(np.float64)
        out[part] = (x * y).sum(axis=1)
    return np.clip(out, -1.0, 1.0)


def cosine_scores(query: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Cosine scores of one unit vector against rows of unit vectors (see :func:`pair_cosines`)."""
    q = np.asarray(query).reshape(1, -1)
    return pair_cosines(q, np.asarray(vectors).reshape(-1, q.shape[1]))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine score of one pair (see :func:`pair_cosines`)."""
    return float(pair_cosines(np.asarray(a)[None, :], np.asarray(b)[None, :])[0])


def image_key(patient_id: str | None, collection: str | None) -> str:
    """The key AS-norm leaves a patient out by: collection and id ("" when the patient or its
    collection is unknown, so nobody is left out)."""
    if not patient_id or collection is None:
        return ""
    return patient_key(f"{collection}\x00{patient_id}")


def score_norm_of(calibration: Calibration) -> ScoreNorm | None:
    """The AS-norm the calibration decides with, or None when it decides on raw cosines."""
    return ScoreNorm.from_dict(calibration.score_norm) if calibration.score_norm else None


class PairScorer:
    """Decision scores of pairs among a fixed set of vectors: raw cosines, or their AS-norm against
    the calibration's cohort, leaving out both patients of each pair (``keys``, from
    :func:`image_key` or :func:`models.scoring.scorenorm.patient_key`; "" leaves nobody out)."""

    def __init__(self, calibration: Calibration, vectors: np.ndarray, keys: Sequence[str]) -> None:
        self.vectors = np.asarray(vectors)
        self.norm = score_norm_of(calibration)
        if self.norm is not None and len(self.vectors):
            self.side = self.norm.neighbours(self.vectors)
            self.codes = self.norm.codes(list(keys))

    def score(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Decision scores of rows ``a[i]`` with ``b[i]``."""
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        raw = pair_cosines(self.vectors[a], self.vectors[b])
        if self.norm is None or raw.size == 0:
            return raw
        return self.norm.normalise_pairs(raw, self.side, a, self.codes[a], self.side, b, self.codes[b])

    def floors(self, threshold: float) -> np.ndarray:
        """Per row, the lowest cosine at which a pair with it can reach ``threshold``."""
        if self.norm is None:
            return np.full(len(self.vectors), threshold)
        return ScoreNorm.floors(threshold, self.norm.bounds(self.side))


@dataclass(frozen=True)
class OperatingPoint:
    """A decision threshold and the false-accept rate it stands for on the calibration in force."""

    threshold: float
    far: float
    source: str  # "default" | "far" | "threshold"
    calibration: dict[str, Any] = field(default_factory=dict, compare=False)  # Calibration.summary()


def operating_point(
    calibration: Calibration,
    *,
    far: str | float | None = None,
    threshold: float | None = None,
    default_far: str = "1e-3",
    default_threshold: float | None = None,
) -> OperatingPoint:
    """The operating point of a request: an explicit threshold, a FAR, or the default (a threshold
    pinned by the operator, else ``default_far``)."""
    if far is not None and threshold is not None:
        raise ValueError("give either 'far' or 'threshold', not both")
    summary = calibration.summary()
    if threshold is not None:
        if calibration.score_norm is not None:  # AS-norm units: any finite score
            if not math.isfinite(threshold):
                raise ValueError(f"threshold must be a finite score, got {threshold}")
        elif not (math.isfinite(threshold) and -1.0 <= threshold <= 1.0):
            raise ValueError(f"threshold must be a cosine score in [-1, 1], got {threshold}")
        return OperatingPoint(float(threshold), calibration.far_at(threshold), "threshold", summary)
    if far is not None:
        try:
            value = calibration.threshold_for(far)
            far_value = float(far)
        except ValueError as exc:
            raise ValueError(f"far: {exc}") from None
        return OperatingPoint(value, far_value, "far", summary)
    if default_threshold is not None:
        return OperatingPoint(default_threshold, calibration.far_at(default_threshold), "default", summary)
    return OperatingPoint(calibration.threshold_for(default_far), float(default_far), "default", summary)


def is_same_patient(score: float, point: OperatingPoint) -> bool:
    """The one decision rule: same patient when the score reaches the threshold."""
    return bool(score >= point.threshold)


@dataclass(frozen=True)
class Posterior:
    """P(same patient | score) and the prior it is at.

    ``prior_source`` "operating_point": the prior at which the operating point's threshold is the Bayes
    decision (:meth:`Calibration.bayes_prior`), so ``probability >= 0.5`` exactly when the decision is
    "same patient"; "request": the caller's own prior (a site's misfile base rate, say), at which the
    probability may disagree with the FAR-based decision, since they answer different questions.
    """

    probability: float
    prior: float
    prior_source: str  # "operating_point" | "request"


def posterior(
    calibration: Calibration, score: float, point: OperatingPoint, prior: float | None = None
) -> Posterior:
    """The probability a decision at ``point`` comes with: at ``prior``, else at the point's Bayes prior.
    ValueError when ``prior`` is not in (0, 1)."""
    if prior is None:
        chance = calibration.probability_at_bayes_prior(score, point.threshold)
        return Posterior(float(chance), calibration.bayes_prior(point.threshold), "operating_point")
    used = check_prior(prior)
    return Posterior(float(calibration.probability(score, prior=used)), used, "request")
