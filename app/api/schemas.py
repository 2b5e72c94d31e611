"""Response models: the JSON shapes of the HTTP API (they also document it at /docs)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from app.api.dependencies import clean_label
from app.service.decoding import QueryImage
from app.service.results import AlertView, ScoredRecord
from index import AlertRecord, ImageRecord
from models.scoring.decide import OperatingPoint


class FieldError(BaseModel):
    """One request field the service rejected before doing anything (422 validation errors)."""

    field: str = Field(description="where the field is, e.g. `query.limit` or `body.k`")
    message: str = Field(description="what is wrong with it")


class ErrorResponse(BaseModel):
    """The body of every 4xx and 5xx answer."""

    detail: str = Field(description="what is wrong and, where it helps, what to do about it")
    errors: list[FieldError] | None = Field(
        default=None, description="for request validation errors: one entry per rejected field"
    )


ERROR_DESCRIPTIONS = {
    400: "the request body cannot be parsed (e.g. broken multipart data)",
    401: "missing or wrong `X-API-Key` (only when the service has API keys)",
    403: "the API key's scope is too low for this (read < write < admin)",
    404: "unknown image id or patient",
    409: "refused: the site's labelled images cannot support the calibration (nothing changed)",
    413: "request body over the upload limit",
    415: "the request body is not of a media type this route takes",
    422: "an unusable image or a missing, malformed or contradictory field",
    429: "too many rejected API keys from this address: wait `Retry-After` seconds",
    500: "a bug: the service logged it; nothing was written",
    507: "the data dir's disk is full: the write was rolled back, send it again once there is space",
    503: "not ready: the model is loading, or the gallery cannot be served (locked by another "
    "process, unreadable, or holding another model's vectors)",
}


def error_responses(*codes: int, **descriptions: str) -> dict[int | str, dict]:
    """OpenAPI `responses` for these status codes, all with the ErrorResponse body.

    ``descriptions`` (keyed ``e404=...``) replace the generic wording for one route.
    """
    return {
        code: {"model": ErrorResponse, "description": descriptions.get(f"e{code}", ERROR_DESCRIPTIONS[code])}
        for code in codes
    }


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
    """The threshold decisions use, and the false-accept rate it stands for."""

    threshold: float = Field(description="score at or above which two images count as the same patient")
    far: float = Field(description="false-accept rate the threshold stands for on the calibration in force")
    calibration: CalibrationOut = Field(description="the calibration the threshold and FAR come from")

    @classmethod
    def of(cls, point: OperatingPoint) -> OperatingPointOut:
        return cls(threshold=point.threshold, far=point.far, calibration=CalibrationOut(**point.calibration))


# ---------------------------------------------------------------------------------------------- embed
class ImageSize(BaseModel):
    """Size of the decoded image, in pixels."""

    width: int = Field(description="columns")
    height: int = Field(description="rows")


MODEL_ID_DESCRIPTION = "the model that made the embeddings (its weights and preprocessing)"


class EmbedResult(BaseModel):
    """The identity embedding of one uploaded image."""

    filename: str = Field(description="the upload's file name")
    model_id: str = Field(description=MODEL_ID_DESCRIPTION)
    dim: int = Field(description="length of the embedding")
    encoding: Literal["json", "base64"] = Field(description="how `embedding` is written (`?encoding=`)")
    embedding: list[float] | str = Field(
        description="unit-norm float32 vector: a JSON list, or base64 of little-endian float32 bytes"
    )
    image_size: ImageSize = Field(description="the decoded image's size")
    source_format: str = Field(description="dicom | png | jpeg | tiff (from the file's bytes, not its name)")
    identifiers: dict[str, str] = Field(
        description="DICOM SOPInstanceUID, StudyInstanceUID, ViewPosition when present; never names, "
        "birth dates or the PatientID"
    )


class EmbedResponse(BaseModel):
    """Embeddings of the uploaded images, in upload order."""

    model_id: str = Field(description=MODEL_ID_DESCRIPTION)
    results: list[EmbedResult] = Field(description="one per uploaded file")


# ---------------------------------------------------------------------------------------------- images
IMAGE_ID_DESCRIPTION = "the gallery's id of the image (never reused)"
PATIENT_ID_DESCRIPTION = "the patient the image is filed under; null = unknown"
COLLECTION_DESCRIPTION = "the gallery collection the image belongs to"


class ImageOut(BaseModel):
    """A gallery image: its labels and metadata (never its pixels or DICOM names and dates of birth)."""

    image_id: int = Field(description=IMAGE_ID_DESCRIPTION)
    patient_id: str | None = Field(description=PATIENT_ID_DESCRIPTION)
    collection: str = Field(description=COLLECTION_DESCRIPTION)
    model_id: str = Field(description="the model its stored embedding comes from")
    created_at: str = Field(description="ISO-8601 UTC time of enrolment")
    sha256: str | None = Field(description="SHA-256 of the uploaded bytes")
    sop_instance_uid: str | None = Field(description="DICOM SOPInstanceUID, when known")
    study_instance_uid: str | None = Field(description="DICOM StudyInstanceUID, when known")
    view: str | None = Field(description="view position, e.g. PA, AP, LL")
    study_date: str | None = Field(description="study date as given, or the DICOM StudyDate")
    split: str | None = Field(description="data-set split label, e.g. train / val / test")
    tags: dict[str, str | int | float | bool | None] = Field(description="free metadata given at enrolment")
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
    """A gallery image scored against a query."""

    image_id: int = Field(description=IMAGE_ID_DESCRIPTION)
    patient_id: str | None = Field(description=PATIENT_ID_DESCRIPTION)
    collection: str = Field(description=COLLECTION_DESCRIPTION)
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
    """A wrong-patient warning raised at enrolment: check how the image was filed."""

    kind: Literal["matches_other_patient", "no_match_with_own_images"] = Field(
        description="matches_other_patient: it looks like another patient of the collection; "
        "no_match_with_own_images: it looks like none of its patient's earlier images"
    )
    message: str = Field(description="the warning in words")
    score: float = Field(description="the other patient's match score, or the best score with own images")
    other_patient_id: str | None = Field(
        default=None, description="the patient it matches (matches_other_patient)"
    )
    other_image_id: int | None = Field(default=None, description="that patient's best-matching image")
    own_best_score: float | None = Field(description="best score against the patient's earlier images")
    own_images: int = Field(description="earlier images of the patient it was compared with")
    alert_id: int | None = Field(
        default=None, description="the stored alert: `GET /alerts/{alert_id}`, resolve with `POST` there"
    )

    @classmethod
    def of(cls, alert: AlertRecord | None) -> AlertOut | None:
        """An enrolment's stored alert, in the fields this answer has always carried."""
        if alert is None:
            return None
        return cls(
            kind=alert.kind,
            message=alert.message,
            score=alert.score,
            other_patient_id=alert.other_patient_id,
            other_image_id=alert.other_image_id,
            own_best_score=alert.own_best_score,
            own_images=alert.own_images,
            alert_id=alert.alert_id,
        )


AlertState = Literal["open", "confirmed", "dismissed", "relabelled", "deleted"]


class StoredAlertOut(BaseModel):
    """A wrong-patient alert as the gallery keeps it: what was found, about which image as it was
    filed, at which operating point, and how (by whom, when) it was resolved."""

    alert_id: int = Field(description="the alert's id (never reused)")
    state: AlertState = Field(
        description="open: waiting for review; confirmed: the image is misfiled; dismissed: a false "
        "alarm; relabelled: the image was filed under `new_patient_id`; deleted: the image was deleted "
        "while the alert was open"
    )
    kind: Literal["matches_other_patient", "no_match_with_own_images"] = Field(
        description="matches_other_patient: it looks like another patient of the collection; "
        "no_match_with_own_images: it looks like none of its patient's earlier images"
    )
    message: str = Field(description="the warning in words, as raised")
    image_id: int = Field(description="the enrolled image the alert is about")
    collection: str = Field(description=COLLECTION_DESCRIPTION)
    patient_id: str | None = Field(
        description="the patient the image was filed under when the alert was raised"
    )
    score: float = Field(description="the other patient's match score, or the best score with own images")
    other_patient_id: str | None = Field(description="the patient it matched (matches_other_patient)")
    other_image_id: int | None = Field(description="that patient's best-matching image")
    own_best_score: float | None = Field(description="best score against the patient's earlier images")
    own_images: int = Field(description="earlier images of the patient it was compared with")
    operating_point: dict[str, Any] = Field(
        description="the operating point in force when it was raised: threshold, far, source and the "
        "calibration summary"
    )
    created_at: str = Field(description="ISO-8601 UTC time it was raised (the image's enrolment)")
    resolved_at: str | None = Field(description="ISO-8601 UTC time it was resolved or closed")
    resolved_by: str | None = Field(
        description='the API key id that resolved it ("anonymous" when the service has no keys)'
    )
    note: str | None = Field(description="the reviewer's note")
    new_patient_id: str | None = Field(description="relabelled: the patient the image was moved to")

    @classmethod
    def of(cls, alert: AlertRecord) -> StoredAlertOut:
        return cls(**alert.__dict__)


class AlertItem(StoredAlertOut):
    """A stored alert with its image and the image it matched, as they are now (what a review page shows
    side by side)."""

    image: ImageOut | None = Field(description="the alert's image now; null once deleted")
    other_image: ImageOut | None = Field(description="the image it matched, now; null if none or deleted")

    @classmethod
    def of_view(cls, view: AlertView) -> AlertItem:
        return cls(
            **StoredAlertOut.of(view.alert).model_dump(),
            image=ImageOut.of(view.image) if view.image is not None else None,
            other_image=ImageOut.of(view.other_image) if view.other_image is not None else None,
        )


class AlertPage(BaseModel):
    """One page of stored alerts, newest first."""

    total: int = Field(description="alerts matching the filters, over all pages")
    offset: int = Field(description="items skipped before this page")
    limit: int = Field(description="most items in this page")
    items: list[AlertItem] = Field(description="the alerts of this page")


class AlertResolution(BaseModel):
    """How a reviewer resolves an open alert."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["confirm", "dismiss", "relabel"] = Field(
        description="confirm: the image is misfiled (the gallery is not changed); dismiss: a false "
        "alarm; relabel: file the image under `patient_id`"
    )
    patient_id: Annotated[str | None, AfterValidator(clean_label)] = Field(
        default=None,
        description="relabel only: the patient to file the image under; default: the patient it matched",
    )
    note: str | None = Field(default=None, max_length=2000, description="free text kept with the alert")


class EnrolledImage(BaseModel):
    """One enrolled upload: its new gallery record, its best matches and any wrong-patient alert."""

    image_id: int = Field(description=IMAGE_ID_DESCRIPTION)
    filename: str = Field(description="the upload's file name")
    image: ImageOut = Field(description="the gallery record as stored")
    duplicate_of: int | None = Field(
        description="an earlier image of this collection with byte-identical content under another "
        "patient id, or earlier in this request, if any (the upload is still enrolled)"
    )
    already_enrolled: bool = Field(
        default=False,
        description="true when this very file is already filed in the collection under the same patient "
        "id (a retried request): nothing new is stored, `image_id` is the stored image, and matches "
        "and alert are empty",
    )
    matches: list[MatchOut] = Field(description="best gallery matches at enrol time (same collection)")
    alert: AlertOut | None = Field(description="wrong-patient warning, or null")


class EnrolResponse(BaseModel):
    """The images of one enrolment request, in upload order."""

    model_id: str = Field(description=MODEL_ID_DESCRIPTION)
    operating_point: OperatingPointOut = Field(description="the threshold matches and alerts were decided at")
    images: list[EnrolledImage] = Field(description="one per uploaded file")


OFFSET_DESCRIPTION = "items skipped before this page"
LIMIT_DESCRIPTION = "most items in this page"


class ImagePage(BaseModel):
    """One page of gallery images, oldest first."""

    total: int = Field(description="images matching the filters, over all pages")
    offset: int = Field(description=OFFSET_DESCRIPTION)
    limit: int = Field(description=LIMIT_DESCRIPTION)
    items: list[ImageOut] = Field(description="the images of this page")


class DeleteResponse(BaseModel):
    """What a delete removed."""

    deleted: int = Field(description="number of gallery images removed")


# ---------------------------------------------------------------------------------------------- verify
class ImageRef(BaseModel):
    """Which image a side of a comparison was: an upload (filename) or a gallery image (image_id)."""

    image_id: int | None = Field(default=None, description="gallery image id (gallery images only)")
    filename: str | None = Field(default=None, description="the upload's file name (uploads only)")
    patient_id: str | None = Field(default=None, description="gallery label (gallery images only)")

    @classmethod
    def of(cls, image: QueryImage) -> ImageRef:
        if image.record is not None:
            return cls(image_id=image.record.image_id, patient_id=image.record.patient_id)
        return cls(filename=image.filename)


THRESHOLD_DESCRIPTION = "the score at or above which the answer is the same patient"
FAR_DESCRIPTION = "the false-accept rate the threshold stands for under the calibration in force"
CALIBRATION_DESCRIPTION = "the calibration the threshold comes from: the model's own or this site's"
SAME_PATIENT_DESCRIPTION = "score >= threshold"
PROBABILITY_DESCRIPTION = (
    "calibrated P(same patient | score) at `prior`: a likelihood-ratio map fitted on the calibration's "
    "same- and different-patient pairs, on the scale of `score`. At the default prior it is >= 0.5 "
    "exactly when `same_patient` is true"
)
PRIOR_DESCRIPTION = (
    "the prior P(same patient) `probability` is at: the request's `prior` (e.g. the site's misfile base "
    "rate), else the prior at which this threshold is the Bayes decision (equal costs for a false "
    "accept and a false reject; smaller for a stricter FAR). At a prior of your own the probability "
    "and `same_patient` answer different questions: how likely the pair is one patient, and whether "
    "its score reaches the line that admits a share `far` of different-patient pairs"
)
PRIOR_SOURCE_DESCRIPTION = (
    "operating_point: the Bayes prior of `threshold` (the default); request: the `prior` sent"
)
#: the request field that sets the prior (multipart form or query)
PRIOR_FIELD_DESCRIPTION = (
    "prior P(same patient) for `probability`, in (0, 1), e.g. the site's misfile base rate; default: "
    "the prior at which the threshold is the Bayes decision"
)


class PairVerification(BaseModel):
    """Are two images the same patient?"""

    mode: Literal["pair"] = Field(default="pair", description="pair: image against image")
    model_id: str = Field(description=MODEL_ID_DESCRIPTION)
    a: ImageRef = Field(description="the first image")
    b: ImageRef = Field(description="the second image")
    score: float = Field(description=SCORE_DESCRIPTION)
    cosine: float = Field(description="cosine similarity of the two embeddings")
    probability: float = Field(description=PROBABILITY_DESCRIPTION)
    prior: float = Field(description=PRIOR_DESCRIPTION)
    prior_source: Literal["operating_point", "request"] = Field(description=PRIOR_SOURCE_DESCRIPTION)
    same_patient: bool = Field(description=SAME_PATIENT_DESCRIPTION)
    threshold: float = Field(description=THRESHOLD_DESCRIPTION)
    far: float = Field(description=FAR_DESCRIPTION)
    calibration: CalibrationOut = Field(description=CALIBRATION_DESCRIPTION)


class PatientVerification(BaseModel):
    """Is an image the given patient? Scored against every gallery image of that patient."""

    mode: Literal["patient"] = Field(default="patient", description="patient: image against a patient")
    model_id: str = Field(description=MODEL_ID_DESCRIPTION)
    query: ImageRef = Field(description="the image checked")
    patient_id: str = Field(description="the patient it was checked against")
    collection: str | None = Field(
        description="the collection of the patient's images; null = every collection"
    )
    score: float = Field(description="best score over the patient's images (the decision uses it)")
    cosine: float = Field(description="cosine similarity with the best-scoring image")
    best_score: float = Field(description="the best score over the patient's images (= score)")
    mean_score: float = Field(description="the mean score over the patient's images")
    best_image_id: int = Field(description="the patient's best-scoring gallery image")
    compared_with: int = Field(description="how many of the patient's images were scored")
    probability: float = Field(description=PROBABILITY_DESCRIPTION)
    prior: float = Field(description=PRIOR_DESCRIPTION)
    prior_source: Literal["operating_point", "request"] = Field(description=PRIOR_SOURCE_DESCRIPTION)
    same_patient: bool = Field(description=SAME_PATIENT_DESCRIPTION)
    threshold: float = Field(description=THRESHOLD_DESCRIPTION)
    far: float = Field(description=FAR_DESCRIPTION)
    calibration: CalibrationOut = Field(description=CALIBRATION_DESCRIPTION)


# ---------------------------------------------------------------------------------------------- search
class SearchResponse(BaseModel):
    """The nearest gallery images of a query image, best first."""

    model_id: str = Field(description=MODEL_ID_DESCRIPTION)
    query: ImageRef = Field(description="the query image")
    collection: str | None = Field(description="collection searched; null = every collection")
    k: int = Field(description="most matches asked for")
    operating_point: OperatingPointOut = Field(description="the threshold `same_patient` was decided at")
    matches: list[MatchOut] = Field(description="best first")


# ---------------------------------------------------------------------------------------------- duplicates
class PairImage(BaseModel):
    """One image of a duplicate pair."""

    image_id: int = Field(description=IMAGE_ID_DESCRIPTION)
    patient_id: str | None = Field(description=PATIENT_ID_DESCRIPTION)
    collection: str = Field(description=COLLECTION_DESCRIPTION)


class DuplicatePairOut(BaseModel):
    """Two gallery images whose score reaches the threshold: one patient, or one image twice."""

    a: PairImage = Field(description="the image with the lower id")
    b: PairImage = Field(description="the image with the higher id")
    score: float = Field(description=SCORE_DESCRIPTION)
    conflict: bool = Field(description="both patient ids known and different: one label is probably wrong")
    cluster: int = Field(description="index into `clusters`")


class ClusterOut(BaseModel):
    """Images linked by duplicate pairs (a connected component)."""

    image_ids: list[int] = Field(description="the gallery images of the cluster")
    patient_ids: list[str | None] = Field(description="distinct labels in the cluster")
    conflict: bool = Field(description="more than one known patient id in the cluster")


class DuplicatesResponse(BaseModel):
    """Pairs of gallery images that look like one patient, with label conflicts marked."""

    model_id: str = Field(description=MODEL_ID_DESCRIPTION)
    collection: str | None = Field(description="the collection searched; null = every collection")
    operating_point: OperatingPointOut = Field(description="the threshold pairs were found at")
    total_pairs: int = Field(description="pairs found, over all pages")
    total_conflicts: int = Field(description="pairs whose patient ids disagree, over all pages")
    offset: int = Field(description=OFFSET_DESCRIPTION)
    limit: int = Field(description=LIMIT_DESCRIPTION)
    pairs: list[DuplicatePairOut] = Field(description="this page of pairs, best first")
    clusters: list[ClusterOut] = Field(description="every cluster of the pairs found, largest first")


# ---------------------------------------------------------------------------------------------- health
class Health(BaseModel):
    """The process is alive (it may still be loading the model)."""

    status: Literal["ok"] = Field(default="ok", description="always ok")


KEY_HOLDERS = " (with API keys configured: only for a key with the read scope)"


class AdaptationOut(BaseModel):
    """Where an adapted model came from (``cxr-reid adapt``): its base and the site data it learnt."""

    base_model_id: str = Field(description="the model it was adapted from")
    site_data: str = Field(description="what the site's images were (a manifest, DICOM folder or gallery)")
    site_listing_sha256: str = Field(description="hash of the site data's listing (patient id, file, size)")
    site_images: int = Field(description="labelled site images")
    site_patients: int = Field(description="their patients")
    held_back_auc_before: float | None = Field(description="AUC of the base on the held-back patients")
    held_back_auc_after: float | None = Field(description="AUC of the adapted network on them")
    adapted_at: str = Field(description="when (UTC, ISO-8601)")

    @classmethod
    def of(cls, training: dict[str, Any]) -> AdaptationOut | None:
        """From a checkpoint's training summary; None for a model that was not adapted."""
        record = training.get("adaptation")
        if not record:
            return None
        site, held = record["site"], record["held_back"]
        return cls(
            base_model_id=record["base_model_id"],
            site_data=site["data"],
            site_listing_sha256=site["listing_sha256"],
            site_images=site["images"],
            site_patients=site["patients"],
            held_back_auc_before=held["before"].get("auc"),
            held_back_auc_after=held["after"].get("auc"),
            adapted_at=record["adapted_at"],
        )


class ReplicationOut(BaseModel):
    """Where this replica is in the gallery database's change log (PostgreSQL galleries only)."""

    database: str = Field(description="the database followed (without its password)")
    listening: bool = Field(description="connected and listening for the database's change notifications")
    applied_change: int = Field(description="the last change applied to this replica's index")
    latest_change: int = Field(description="the newest change committed in the database")
    behind: int = Field(description="changes committed but not applied here yet")
    lag_seconds: float = Field(description="age of the oldest change not applied here (0: up to date)")
    generation: int = Field(description="the gallery generation this replica's index is at")
    apply_lag_p50_ms: float | None = Field(
        default=None, description="median time from a change's commit to its apply here (recent changes)"
    )
    apply_lag_p99_ms: float | None = Field(default=None, description="99th percentile of the same")
    switching_model: bool = Field(
        default=False,
        description="a reindex switched the gallery to a new model and this replica is rebuilding its index "
        "for it (requests wait until it serves the new model)",
    )


class Readiness(BaseModel):
    """The model is loaded and the gallery can be served."""

    status: Literal["ready"] = Field(default="ready", description="always ready (else the answer is a 503)")
    model_id: str | None = Field(default=None, description=f"the model served{KEY_HOLDERS}")
    embedding_dim: int | None = Field(default=None, description=f"length of its embeddings{KEY_HOLDERS}")
    gallery_images: int | None = Field(
        default=None,
        description=f"images in the gallery: every collection, or the key's own collections{KEY_HOLDERS}",
    )
    index: str | None = Field(
        default=None,
        description="the FAISS layout searches use now, e.g. Flat or IVF1024,Flat (with "
        f"index_factory=auto it follows the gallery's size){KEY_HOLDERS}",
    )
    index_rebuilding: bool | None = Field(
        default=None,
        description="a background rebuild into a bigger layout is running; searches use `index` "
        f"until it is swapped in{KEY_HOLDERS}",
    )
    operating_point: OperatingPointOut | None = Field(
        default=None, description=f"the default threshold and its calibration{KEY_HOLDERS}"
    )
    replication: ReplicationOut | None = Field(
        default=None,
        description=f"with a PostgreSQL gallery: this replica's place in the change log{KEY_HOLDERS}",
    )
    adaptation: AdaptationOut | None = Field(
        default=None,
        description=f"for a model adapted to a site (`cxr-reid adapt`): its base and site data{KEY_HOLDERS}",
    )


# ---------------------------------------------------------------------------------------------- calibration
class CalibrationDetail(BaseModel):
    """The calibration in force, with its thresholds and where they come from."""

    calibration: CalibrationOut = Field(description="which calibration is in force")
    default_far: str = Field(description="the FAR of the service's default operating point")
    thresholds: dict[str, float] = Field(
        description="threshold per calibrated FAR, in the calibration's units: cosine, or AS-norm units "
        "(normalised scores) when `calibration.score_norm` is set"
    )
    default_prior: float = Field(
        description="the prior P(same patient) at which the default threshold is the Bayes decision: "
        "the prior of every probability given at the default operating point without a `prior`"
    )
    threshold_ci: dict[str, list[float]] = Field(
        default_factory=dict,
        description="95% patient-bootstrap interval of each threshold (site calibrations)",
    )
    provenance: dict = Field(
        default_factory=dict, description="what it was fitted on: data, collection, model id, counts, date"
    )
