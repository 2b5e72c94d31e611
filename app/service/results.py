"""What the service answers, as plain data classes the API and the CLI turn into their own forms.

A wrong-patient alert is the gallery's own record (``index.NewAlert`` as the check finds it,
``index.AlertRecord`` once stored): its fields are declared there once, not copied here."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from index import AlertRecord, DuplicatePair, ImageRecord

log = logging.getLogger(__name__)


@dataclass
class ScoredRecord:
    record: ImageRecord
    score: float  # the decision score (the cosine, or its AS-norm)
    same_patient: bool
    cosine: float = math.nan


@dataclass
class PairVerdict:
    score: float
    cosine: float
    probability: float  # P(same patient | score) at ``prior``
    same_patient: bool
    prior: float  # see models.scoring.decide.Posterior
    prior_source: str  # "operating_point" | "request"


@dataclass
class PatientVerdict:
    patient_id: str
    collection: str | None
    best_score: float
    mean_score: float
    best_image_id: int
    compared_with: int
    same_patient: bool
    probability: float  # P(same patient | best_score) at ``prior``
    prior: float
    prior_source: str  # "operating_point" | "request"
    best_cosine: float = math.nan


@dataclass
class AlertView:
    """A stored alert with its image and the image it matched, as they are now (None: deleted)."""

    alert: AlertRecord
    image: ImageRecord | None
    other_image: ImageRecord | None


@dataclass
class EnrolResult:
    record: ImageRecord
    matches: list[ScoredRecord]
    alert: AlertRecord | None  # the wrong-patient alert as stored (index's record: one declaration)
    duplicate_of: int | None
    already_enrolled: bool = False  # this very file was filed already (a retried request): not stored


@dataclass
class Cluster:
    """Images linked by duplicate pairs, with the distinct labels among them."""

    image_ids: list[int]
    patient_ids: list[str | None]  # known ids first (sorted), then None if some are unlabelled
    conflict: bool  # more than one known patient id: a label is probably wrong


@dataclass
class GalleryStatus:
    """What readiness reports of the gallery being served."""

    images: int
    index: str  # the FAISS index factory in effect
    index_rebuilding: bool
    replication: dict | None = None  # a PostgreSQL gallery: this replica's place in the change log


@dataclass
class DuplicateReport:
    pairs: list[DuplicatePair]  # best first; only conflicts when asked for
    clusters: list[Cluster]  # connected components of `pairs`, largest first
    total_conflicts: int  # over every pair at the threshold, whatever the filter
