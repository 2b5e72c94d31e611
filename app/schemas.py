"""Response models: the JSON shapes of the HTTP API (they also document it at /docs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from index import ImageRecord

from .services import Alert, OperatingPoint, ScoredRecord


class ErrorResponse(BaseModel):
    detail: str = Field(description="what is wrong, in words")


class CalibrationOut(BaseModel):
    """Which calibration turns scores into decisions: the model's own or this site's."""

    source: Literal["shipped", "site"] = Field(
        description="shipped: fitted in training on the model's validation patients (at a site unlike "
        "them the promised FAR does not hold); site: fitted on this site's labelled images "
        "(POST /calibration or `cxr-reid calibrate`)"
    )
    genuine_pairs: int = Field(description="same-patient pairs it was fitted on")
    impostor_pairs: int = Field(description="different-patient pairs it was fitted on")
    patients: int | None = Field(default=None, description="patients of the site data (site only)")
    images: int | None = Field(default=None, description="images of the site data (site only)")
    fitted_at: str | None = Field(default=None, description="ISO-8601 UTC time of the fit (site only)")
    calibration_id: int | None = Field(
        default=None, description="the gallery's id of a site calibration fitted by POST /calibration"
    )
    fars: list[str] = Field(description="false-accept rates with a calibrated threshold")
    score_norm: str | None = Field(
        default=None, description="the score normalisation its thresholds are in (null: raw cosines)"
    )


SCORE_DESCRIPTION = (
    "the score decisions use: the cosine similarity, or its AS-norm (standard deviations above each "
    "image's nearest other patients at this site) when a site calibration normalises scores"
)


class OperatingPointOut(BaseModel):
    threshold: float = Field(description="score at or above which two images count as the same patient")
    far: float = Field(description="false-accept rate the threshold stands for on the calibration in force")
    calibration: CalibrationOut = Field(description="the calibration the threshold and FAR come from")

    @classmethod
    def of(cls, point: OperatingPoint) -> OperatingPointOut:
        return cls(threshold=point.threshold, far=point.far, calibration=CalibrationOut(**point.calibration))


# ---------------------------------------------------------------------------------------------- embed
class ImageSize(BaseModel):
    width: int
    height: int


class EmbedResult(BaseModel):
    filename: str
    model_id: str
    dim: int
    encoding: Literal["json", "base64"]
    embedding: list[float] | str = Field(
        description="unit-norm float32 vector: a JSON list, or base64 of little-endian float32 bytes"
    )
    image_size: ImageSize
    source_format: str = Field(description="dicom | png | jpeg | tiff (from the file's bytes, not its name)")
    identifiers: dict[str, str] = Field(
        description="DICOM SOPInstanceUID, StudyInstanceUID, ViewPosition when present; never names, "
        "birth dates or the PatientID"
    )


class EmbedResponse(BaseModel):
    model_id: str
    results: list[EmbedResult]


# ---------------------------------------------------------------------------------------------- images
class ImageOut(BaseModel):
    image_id: int
    patient_id: str | None
    collection: str
    model_id: str
    created_at: str
    sha256: str | None
    sop_instance_uid: str | None
    study_instance_uid: str | None
    view: str | None
    study_date: str | None
    split: str | None
    tags: dict[str, str | int | float | bool | None]
    source_path: str | None = Field(description="external original (bulk enrolment), when referenced by path")
    stored: bool = Field(description="whether the gallery keeps a copy of the original (for reindex)")

    @classmethod
    def of(cls, record: ImageRecord) -> ImageOut:
        return cls(
            image_id=record.image_id,
            patient_id=record.patient_id,
            collection=record.collection,
            model_id=record.model_id,
            created_at=record.created_at,
            sha256=record.sha256,
            sop_instance_uid=record.sop_instance_uid,
            study_instance_uid=record.study_instance_uid,
            view=record.view,
            study_date=record.study_date,
            split=record.split,
            tags=dict(record.tags or {}),
            source_path=record.source_path,
            stored=record.stored_path is not None,
        )


class MatchOut(BaseModel):
    image_id: int
    patient_id: str | None
    collection: str
    score: float = Field(description=SCORE_DESCRIPTION)
    cosine: float = Field(description="cosine similarity with the query")
    same_patient: bool = Field(description="score >= threshold (the same rule /verify uses)")

    @classmethod
    def of(cls, match: ScoredRecord) -> MatchOut:
        return cls(
            image_id=match.record.image_id,
            patient_id=match.record.patient_id,
            collection=match.record.collection,
            score=match.score,
            cosine=match.cosine,
            same_patient=match.same_patient,
        )


class AlertOut(BaseModel):
    kind: Literal["matches_other_patient", "no_match_with_own_images"]
    message: str
    score: float = Field(description="the other patient's match score, or the best score with own images")
    other_patient_id: str | None = None
    other_image_id: int | None = None
    own_best_score: float | None = Field(description="best score against the patient's earlier images")
    own_images: int = Field(description="earlier images of the patient it was compared with")

    @classmethod
    def of(cls, alert: Alert | None) -> AlertOut | None:
        if alert is None:
            return None
        return cls(**alert.__dict__)


class EnrolledImage(BaseModel):
    image_id: int
    filename: str
    image: ImageOut
    duplicate_of: int | None = Field(
        description="an earlier image of this collection with byte-identical content, if any "
        "(the upload is still enrolled)"
    )
    matches: list[MatchOut] = Field(description="best gallery matches at enrol time (same collection)")
    alert: AlertOut | None = Field(description="wrong-patient warning, or null")


class EnrolResponse(BaseModel):
    model_id: str
    operating_point: OperatingPointOut
    images: list[EnrolledImage]


class ImagePage(BaseModel):
    total: int
    offset: int
    limit: int
    items: list[ImageOut]


class DeleteResponse(BaseModel):
    deleted: int


# ---------------------------------------------------------------------------------------------- verify
class ImageRef(BaseModel):
    image_id: int | None = None
    filename: str | None = None
    patient_id: str | None = Field(default=None, description="gallery label (gallery images only)")


class PairVerification(BaseModel):
    mode: Literal["pair"] = "pair"
    model_id: str
    a: ImageRef
    b: ImageRef
    score: float = Field(description=SCORE_DESCRIPTION)
    cosine: float = Field(description="cosine similarity of the two embeddings")
    probability: float = Field(description="calibrated P(same patient | score) at a 50/50 prior")
    same_patient: bool
    threshold: float
    far: float
    calibration: CalibrationOut


class PatientVerification(BaseModel):
    mode: Literal["patient"] = "patient"
    model_id: str
    query: ImageRef
    patient_id: str
    collection: str | None
    score: float = Field(description="best score over the patient's images (the decision uses it)")
    cosine: float = Field(description="cosine similarity with the best-scoring image")
    best_score: float
    mean_score: float
    best_image_id: int
    compared_with: int = Field(description="how many of the patient's images were scored")
    probability: float
    same_patient: bool
    threshold: float
    far: float
    calibration: CalibrationOut


# ---------------------------------------------------------------------------------------------- search
class SearchResponse(BaseModel):
    model_id: str
    query: ImageRef
    collection: str | None = Field(description="collection searched; null = every collection")
    k: int
    operating_point: OperatingPointOut
    matches: list[MatchOut]


# ---------------------------------------------------------------------------------------------- duplicates
class PairImage(BaseModel):
    image_id: int
    patient_id: str | None
    collection: str


class DuplicatePairOut(BaseModel):
    a: PairImage
    b: PairImage
    score: float
    conflict: bool = Field(description="both patient ids known and different: one label is probably wrong")
    cluster: int = Field(description="index into `clusters`")


class ClusterOut(BaseModel):
    image_ids: list[int]
    patient_ids: list[str | None] = Field(description="distinct labels in the cluster")
    conflict: bool = Field(description="more than one known patient id in the cluster")


class DuplicatesResponse(BaseModel):
    model_id: str
    collection: str | None
    operating_point: OperatingPointOut
    total_pairs: int
    total_conflicts: int
    offset: int
    limit: int
    pairs: list[DuplicatePairOut]
    clusters: list[ClusterOut]


# ---------------------------------------------------------------------------------------------- health
class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"
    model_id: str
    embedding_dim: int
    gallery_images: int
    operating_point: OperatingPointOut


# ---------------------------------------------------------------------------------------------- calibration
class CalibrationDetail(BaseModel):
    """The calibration in force, with its thresholds and where they come from."""

    calibration: CalibrationOut
    default_far: str = Field(description="the FAR of the service's default operating point")
    thresholds: dict[str, float] = Field(description="cosine threshold per calibrated FAR")
    threshold_ci: dict[str, list[float]] = Field(
        default_factory=dict,
        description="95% patient-bootstrap interval of each threshold (site calibrations)",
    )
    provenance: dict = Field(
        default_factory=dict, description="what it was fitted on: data, collection, model id, counts, date"
    )
