"""The duplicates report: every gallery pair at or above a threshold, scored exactly, with its
clusters and label conflicts, and the cache that lets a client page through one report.

A job of its own (an O(n^2) scan, bounded by a floor on the threshold and a cap on pairs, one at a
time), kept apart from ``reid``'s per-image work. :class:`DuplicatesReport` is mixed into
``ReidService`` (the API and the review pages see one service object); it uses the service's
gallery, scorer and calibration.
"""

from __future__ import annotations

import threading

from app.service.errors import InvalidInputError
from app.service.results import Cluster, DuplicateReport
from app.service.scoring import SCORE_SLACK, Scorer, record_key
from index import DuplicatePair, Gallery, cluster_pairs
from models.scoring.calibration import Calibration
from models.scoring.decide import OperatingPoint, is_same_patient

#: The loosest operating point a scan may run at, the most candidate pairs one scan may hold, and
#: how many finished reports are kept for paging.
DUPLICATES_LOWEST_FAR = 1e-1
DUPLICATES_MAX_PAIRS = 200_000
DUPLICATES_CACHED_REPORTS = 4


class DuplicatesReport:
    """The duplicates part of ``ReidService`` (see the module docstring)."""

    # provided by ReidService
    gallery: Gallery  # the open gallery; UnavailableError when none can serve
    calibration: Calibration
    scorer: Scorer

    def __init__(self) -> None:
        self._duplicates_lock = threading.Lock()
        self._duplicates_cache: dict[tuple, DuplicateReport] = {}

    def duplicates_floor(self) -> float:
        """The lowest threshold a scan runs at: the calibration's FAR 1e-1 point (below it a large
        share of all pairs would be listed, at O(n^2) memory)."""
        calibration = self.calibration
        try:
            return calibration.threshold_for(DUPLICATES_LOWEST_FAR)
        except ValueError:
            return min(calibration.thresholds.values())

    def duplicates(
        self, *, point: OperatingPoint, collection: str | None, conflicts_only: bool
    ) -> DuplicateReport:
        """Every pair at or above the threshold (exact scores), best first, and their clusters.

        One report is computed at a time (concurrent requests wait instead of each holding the
        O(n^2) scan in memory) and kept per gallery generation, collection, threshold and
        calibration, so paging through it or asking again does not recompute it.
        """
        floor = self.duplicates_floor()
        if point.threshold < floor:
            raise InvalidInputError(
                f"threshold {point.threshold:.4g} is below {floor:.4g}, the calibration's FAR "
                f"{DUPLICATES_LOWEST_FAR:g} point: that would list a large share of all pairs; use a "
                "higher threshold or a lower far"
            )
        gallery, scorer = self.gallery, self.scorer
        with self._duplicates_lock:
            key = (gallery.generation, collection, point.threshold, scorer)
            report = self._duplicates_cache.pop(key, None) or self._compute_duplicates(
                point, collection, scorer
            )
            self._duplicates_cache[key] = report  # most recent last
            while len(self._duplicates_cache) > DUPLICATES_CACHED_REPORTS:
                self._duplicates_cache.pop(next(iter(self._duplicates_cache)))
        if not conflicts_only:
            return report
        conflicts = [p for p in report.pairs if p.conflict]
        return DuplicateReport(conflicts, clusters(conflicts), report.total_conflicts)

    def _compute_duplicates(
        self, point: OperatingPoint, collection: str | None, scorer: Scorer
    ) -> DuplicateReport:
        """The report for the cache key's scorer (not whatever calibration is in force by now)."""
        candidates = self.gallery.duplicates(
            collection=collection,
            row_thresholds=lambda ids, vectors: scorer.floors(point.threshold, vectors) - SCORE_SLACK,
            max_pairs=DUPLICATES_MAX_PAIRS,
        )
        vectors = self.gallery.get_vectors([i for p in candidates for i in (p.a.image_id, p.b.image_id)])
        kept = []
        for pair in candidates:
            if pair.a.image_id not in vectors or pair.b.image_id not in vectors:
                continue
            _, score = scorer.pair(
                vectors[pair.a.image_id], record_key(pair.a), vectors[pair.b.image_id], record_key(pair.b)
            )
            if is_same_patient(score, point):
                kept.append(DuplicatePair(a=pair.a, b=pair.b, score=score, conflict=pair.conflict))
        total_conflicts = sum(p.conflict for p in kept)
        kept.sort(key=lambda p: (-p.score, p.a.image_id, p.b.image_id))
        return DuplicateReport(kept, clusters(kept), total_conflicts)


def clusters(pairs: list[DuplicatePair]) -> list[Cluster]:
    """Connected components of the pairs' image ids, largest first, with their labels."""
    label = {record.image_id: record.patient_id for pair in pairs for record in (pair.a, pair.b)}
    out = []
    for ids in sorted((sorted(c) for c in cluster_pairs(pairs)), key=lambda c: (-len(c), c[0])):
        names = sorted({label[i] for i in ids}, key=lambda p: (p is None, p or ""))
        out.append(Cluster(ids, names, conflict=sum(p is not None for p in names) > 1))
    return out
