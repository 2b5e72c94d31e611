"""What the service answers, as plain data classes the API and the CLI turn into their own forms."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from index import (
    AlertRecord,
    DuplicatePair,
    ImageRecord,
)

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
    probability: float
    same_patient: bool


@dataclass
class PatientVerdict:
    patient_id: str
    collection: str | None
    best_score: float
    mean_score: float
    best_image_id: int
    compared_with: int
    same_patient: bool
    probability: float
    best_cosine: float = math.nan


@dataclass
class Alert:
    kind: str  # "matches_other_patient" | "no_match_with_own_images"
    message: str
    score: float
    other_patient_id: str | None = None
    other_image_id: int | None = None
    own_best_score: float | None = None
    own_images: int = 0
    alert_id: int | None = None  # its row in the gallery's alerts table, once stored


#: POST /alerts/{id} actions and the state each leaves the alert in.
ALERT_ACTIONS = {"confirm": "confirmed", "dismiss": "dismissed", "relabel": "relabelled"}


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
    alert: Alert | None
    duplicate_of: int | None


@dataclass
class Cluster:
    """Images linked by duplicate pairs, with the distinct labels among them."""

    image_ids: list[int]
    patient_ids: list[str | None]  # known ids first (sorted), then None if some are unlabelled
    conflict: bool  # more than one known patient id: a label is probably wrong


@dataclass
class DuplicateReport:
    pairs: list[DuplicatePair]  # best first; only conflicts when asked for
    clusters: list[Cluster]  # connected components of `pairs`, largest first
    total_conflicts: int  # over every pair at the threshold, whatever the filter
