"""The service's side of scoring: the operating point of a request (its ``ValueError`` becomes an
:class:`~app.service.errors.InvalidInputError`) and :class:`Scorer`, which scores one query against
gallery rows and keeps each gallery image's AS-norm bounds for range searches. The arithmetic (the
cosine, AS-norm, floors, the decision rule) is :mod:`models.scoring.decide`, shared with the audit
and the risk report."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np

from app.service.errors import InvalidInputError
from index import Gallery, ImageRecord
from models.scoring.calibration import Calibration
from models.scoring.decide import OperatingPoint, cosine_scores, image_key, operating_point, score_norm_of
from models.scoring.scorenorm import ScoreNorm

log = logging.getLogger(__name__)

#: Candidates are fetched from FAISS this far below the threshold, then re-scored exactly, so a
#: float-rounding difference between FAISS and numpy never drops a pair that verify would accept.
SCORE_SLACK = 1e-4


def resolve_operating_point(
    calibration: Calibration,
    *,
    far: str | float | None = None,
    threshold: float | None = None,
    default_far: str = "1e-3",
    default_threshold: float | None = None,
) -> OperatingPoint:
    """:func:`models.scoring.decide.operating_point` for a request: a bad FAR or threshold is the
    caller's mistake (InvalidInputError)."""
    try:
        return operating_point(
            calibration,
            far=far,
            threshold=threshold,
            default_far=default_far,
            default_threshold=default_threshold,
        )
    except ValueError as exc:
        if far is None and threshold is None:
            raise  # the service's own default: a configuration fault, not the request's
        raise InvalidInputError(str(exc)) from None


def record_key(record: ImageRecord) -> str:
    """The AS-norm key of a gallery image (see :func:`models.scoring.decide.image_key`)."""
    return image_key(record.patient_id, record.collection)


class Scorer:
    """Cosines -> the scores decisions are made on: the cosines themselves, or their AS-norm against
    the cohort of the calibration in force (``models/scoring/scorenorm.py``), leaving out both patients of
    each pair. One per calibration; it caches each gallery image's bounds for range searches."""

    def __init__(self, calibration: Calibration) -> None:
        self.norm = score_norm_of(calibration)
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
        return ScoreNorm.floors(threshold, self.norm.bounds(self.norm.neighbours(vectors)))

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
