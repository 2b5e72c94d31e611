"""Scores and decisions: how two vectors become a score (:func:`cosine_scores`, or the AS-norm
:class:`Scorer`), how a score becomes a decision (:func:`is_same_patient`) and how an operating
point is chosen (:func:`resolve_operating_point`). /verify, /search, /images and /duplicates all
score pairs here, from the stored vectors, so they never disagree about a pair."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.service.errors import InvalidInputError
from index import (
    Gallery,
    ImageRecord,
)
from models.scoring.calibration import Calibration
from models.scoring.scorenorm import Neighbours, ScoreNorm, patient_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OperatingPoint:
    """A cosine threshold and the false-accept rate it stands for on the calibration in force."""

    threshold: float
    far: float
    source: str  # "default" | "far" | "threshold"
    calibration: dict[str, Any] = field(default_factory=dict, compare=False)  # Calibration.summary()


def resolve_operating_point(
    calibration: Calibration,
    *,
    far: str | float | None = None,
    threshold: float | None = None,
    default_far: str = "1e-3",
    default_threshold: float | None = None,
) -> OperatingPoint:
    """Pick the operating point of a request: an explicit threshold, a FAR, or the service default."""
    if far is not None and threshold is not None:
        raise InvalidInputError("give either 'far' or 'threshold', not both")
    summary = calibration.summary()
    if threshold is not None:
        if calibration.score_norm is not None:  # AS-norm units: any finite score
            if not math.isfinite(threshold):
                raise InvalidInputError(f"threshold must be a finite score, got {threshold}")
        elif not (math.isfinite(threshold) and -1.0 <= threshold <= 1.0):
            raise InvalidInputError(f"threshold must be a cosine score in [-1, 1], got {threshold}")
        return OperatingPoint(float(threshold), calibration.far_at(threshold), "threshold", summary)
    if far is not None:
        try:
            value = calibration.threshold_for(far)
            far_value = float(far)
        except ValueError as exc:
            raise InvalidInputError(f"far: {exc}") from None
        return OperatingPoint(value, far_value, "far", summary)
    if default_threshold is not None:
        return OperatingPoint(default_threshold, calibration.far_at(default_threshold), "default", summary)
    return OperatingPoint(calibration.threshold_for(default_far), float(default_far), "default", summary)


def is_same_patient(score: float, point: OperatingPoint) -> bool:
    """The one decision rule: same patient when the cosine score reaches the threshold."""
    return bool(score >= point.threshold)


def cosine_scores(query: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Cosine scores of one unit vector against rows of unit vectors, in float64, clipped to [-1, 1].

    Row by row (an elementwise product summed along the row), not a matrix product: a BLAS product
    rounds a row differently with the number of rows, and /verify (one pair) and /search (many)
    must give one pair one score, to the last bit.
    """
    q = np.asarray(query, dtype=np.float64).reshape(-1)
    m = np.asarray(vectors, dtype=np.float64).reshape(-1, q.size)
    return np.clip((m * q).sum(axis=1), -1.0, 1.0)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine score of a pair (same arithmetic as :func:`cosine_scores`)."""
    return float(cosine_scores(a, np.asarray(b)[None, :])[0])


def image_key(patient_id: str | None, collection: str | None) -> str:
    """The key AS-norm leaves a patient out by: collection and id, as :meth:`ReidService.calibrate`
    keys the gallery's patients ("" when the patient or its collection is unknown)."""
    if not patient_id or collection is None:
        return ""
    return patient_key(f"{collection}\x00{patient_id}")


def record_key(record: ImageRecord) -> str:
    return image_key(record.patient_id, record.collection)


class Scorer:
    """Cosines -> the scores decisions are made on: the cosines themselves, or their AS-norm against
    the cohort of the calibration in force (``models/scoring/scorenorm.py``), leaving out both patients of
    each pair. One per calibration; it caches each gallery image's bounds for range searches."""

    def __init__(self, calibration: Calibration) -> None:
        self.norm = ScoreNorm.from_dict(calibration.score_norm) if calibration.score_norm else None
        self._bounds: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def scores(
        self, query: np.ndarray, query_key: str, vectors: np.ndarray, keys: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(cosines, decision scores) of one query against rows of ``vectors`` (patients ``keys``)."""
        raw = cosine_scores(query, vectors)
        if self.norm is None or raw.size == 0:
            return raw, raw
        n = raw.size
        decided = self.norm.normalise_pairs(
            raw,
            self.norm.neighbours(np.asarray(query)[None, :]),
            np.zeros(n, dtype=np.int64),
            np.repeat(self.norm.codes([query_key]), n),
            self.norm.neighbours(vectors),
            np.arange(n),
            self.norm.codes(keys),
        )
        return raw, decided

    def pair(self, a: np.ndarray, key_a: str, b: np.ndarray, key_b: str) -> tuple[float, float]:
        raw, decided = self.scores(a, key_a, np.asarray(b)[None, :], [key_b])
        return float(raw[0]), float(decided[0])

    def floors(self, threshold: float, vectors: np.ndarray) -> np.ndarray:
        """Per image, the lowest cosine at which a pair with it can reach ``threshold``."""
        if self.norm is None:
            return np.full(len(vectors), threshold)
        bounds = self.norm.bounds(self.norm.neighbours(vectors))
        sd = bounds[:, 1] if threshold >= 0 else bounds[:, 2]
        return threshold * sd + bounds[:, 0]

    def gallery_floor(self, threshold: float, gallery: Gallery, collection: str | None) -> float:
        """The lowest cosine at which any gallery image of ``collection`` can be in a pair reaching
        ``threshold`` (bounds cached per image; new images computed on the way)."""
        if self.norm is None:
            return threshold
        ids = gallery.image_ids(collection=collection).tolist()
        with self._lock:
            missing = [i for i in ids if i not in self._bounds]
            if missing:
                stored = gallery.get_vectors(missing)
                found = [i for i in missing if i in stored]
                if found:
                    fresh = self.norm.bounds(self.norm.neighbours(np.stack([stored[i] for i in found])))
                    self._bounds.update(zip(found, fresh, strict=True))
            bounds = np.asarray([self._bounds[i] for i in ids if i in self._bounds]).reshape(-1, 3)
        return ScoreNorm.raw_floor(threshold, bounds)

    def query_floor(self, threshold: float, query: np.ndarray) -> float:
        if self.norm is None:
            return threshold
        return ScoreNorm.raw_floor(threshold, self.norm.bounds(self.norm.neighbours(query[None, :])))


def _unused(_: Neighbours) -> None:  # pragma: no cover
    """Keeps the import of Neighbours for type checkers."""
