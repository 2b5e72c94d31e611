"""One DICOM instance into the gallery: the check-and-enrol path that DICOMweb STOW-RS
(:mod:`app.api.routers.dicomweb`) and PACS sync (:mod:`app.pacs.sync`) share.

:func:`ingest_instance` reads the header (:func:`models.imaging.dicom.read_dicom`, no pixels),
checks the SOP UIDs, the study and the Modality, skips an instance whose SOPInstanceUID is already
in the collection (``ALREADY_STORED``; ``OTHER_PATIENT`` when it is stored there under another
PatientID: not enrolled again either, but a conflict to report, with a ``ConflictError`` that names
no patient), then decodes, embeds and enrols it through :meth:`ReidService.enrol` (the
wrong-patient check of ``POST /images``, the original stored without the patient's identity,
:mod:`app.service.phi`). It files the instance under the PatientID, StudyInstanceUID,
SOPInstanceUID and ViewPosition of its tags.

It answers with an :class:`IngestOutcome`, never by raising for one instance's fault, and logs
nothing: each caller reports in its own terms (STOW-RS failure codes in the response dataset, a
C-STORE response's status, the sync run's counts) and keeps its own log lines, which name alert
kinds and ids, never patients. :func:`refusal` is the one table from an outcome to a DICOM failure
code (:class:`Failure`) and its reason in words: STOW-RS puts them in FailureReason and TextValue,
the C-STORE SCP (:mod:`app.pacs.dimse`) in the response's Status and ErrorComment, so a modality sees
the same refusal whichever way it sends.
"""

from __future__ import annotations

import enum
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any

from app.service.decoding import Upload
from app.service.errors import ConflictError, PayloadTooLargeError, ServiceError, UnavailableError
from app.service.reid import ReidService
from app.service.results import EnrolResult
from index import (
    GalleryDuplicateError,
    GalleryError,
    GalleryFullError,
    GalleryValidationError,
    ImageMetadata,
)
from models.imaging.dicom import read_dicom
from models.imaging.preprocess import RADIOGRAPH_MODALITIES
from models.scoring.decide import OperatingPoint

log = logging.getLogger(__name__)

#: A well-formed DICOM UID (PS3.5 9.1): digits and dots, at most 64 characters.
_UID = re.compile(r"[0-9.]{1,64}")
#: One instance at a time between "is this SOPInstanceUID stored?" and its enrolment, so that two
#: requests (or a request and a sync in one process) sending the same instance store it once.
_store_lock = threading.Lock()


class IngestStatus(enum.Enum):
    """What became of an instance, in the order the checks run."""

    UNREADABLE = "unreadable"  # no readable DICOM header; ``error`` is pydicom's exception
    NO_SOP_UIDS = "no SOP UIDs"  # the SOP UIDs the rules ask for are missing or malformed
    OTHER_STUDY = "other study"  # not of the study the rules name
    OTHER_MODALITY = "other modality"  # Modality not among the rules' modalities
    ALREADY_STORED = "already stored"  # its SOPInstanceUID is in the collection: nothing done
    #: its SOPInstanceUID is in the collection under another PatientID: nothing done; ``error`` is a
    #: ConflictError saying so (without either patient id)
    OTHER_PATIENT = "stored under another patient"
    NOT_DECODED = "not decoded"  # decoding or embedding refused it; ``error`` is the ServiceError
    NOT_STORED = "not stored"  # the gallery refused it; ``error`` is the GalleryError
    FAILED = "failed"  # anything else while embedding or enrolling; ``error`` says what
    ENROLLED = "enrolled"  # ``result`` is the enrolment (its image, matches, alert)


#: The TextValue a STOW-RS answer gives an instance already in the collection (same SOPInstanceUID), so a
#: sender (``cxr-reid sync --to``) can tell it from one stored now; both are in ReferencedSOPSequence.
ALREADY_STORED_TEXT = "already in the collection"


class Failure(enum.IntEnum):
    """Why an instance was refused, as a DICOM status: the C-STORE failure statuses of PS3.4 annex B
    and the general ones of PS3.7 annex C, which STOW-RS's FailureReason reuses (PS3.18 10.5.3)."""

    #: over a size or count limit, no room to decode or store, or the gallery not open yet: try later
    OUT_OF_RESOURCES = 0xA700
    DATASET_MISMATCH = 0xA900  # STOW-RS: an instance of another study than the request's target
    CANNOT_UNDERSTAND = 0xC000  # not DICOM, no SOP UIDs, or pixel data that cannot be used
    PROCESSING = 0x0110  # the gallery could not store it (the error is in the server log)
    SOP_CLASS_NOT_SUPPORTED = 0x0122  # not a projection radiograph (Modality not CR / DX / DR / RG)
    DUPLICATE_SOP_INSTANCE = 0x0111  # its SOPInstanceUID is stored under another PatientID


@dataclass(frozen=True)
class Refusal:
    """A refused instance in DICOM terms: the failure code and the reason in words."""

    code: Failure
    reason: str


@dataclass(frozen=True)
class InstanceRules:
    """What an instance must be to be enrolled; each way in states its own."""

    modalities: frozenset[str] = RADIOGRAPH_MODALITIES
    #: every instance must belong to this StudyInstanceUID (STOW-RS ``/studies/{study}``)
    study: str | None = None
    #: SOPClassUID and SOPInstanceUID must both be well-formed UIDs (STOW-RS: its answer names both);
    #: otherwise a non-empty SOPInstanceUID is all that is asked for (PACS sync)
    strict_uids: bool = False


@dataclass
class IngestOutcome:
    status: IngestStatus
    sop_class_uid: str | None = None  # well-formed, else None
    sop_instance_uid: str | None = None
    modality: str = ""  # upper case; "" when the header has none
    error: Exception | None = None
    result: EnrolResult | None = None


def _uid(ds: Any, keyword: str) -> str | None:
    value = str(ds.get(keyword, "") or "").strip("\0 ")
    return value if _UID.fullmatch(value) else None


def _patient(value: Any) -> str:
    """A PatientID as compared here: stripped as the gallery stores it, DICOM's NUL padding too (None
    and empty are one)."""
    return str(value or "").strip().strip("\0").strip()


def _already(
    service: ReidService, outcome: IngestOutcome, sop: str, collection: str, patient_id: str
) -> IngestOutcome | None:
    """The outcome when ``outcome``'s SOPInstanceUID is stored in ``collection`` already (same patient:
    ``ALREADY_STORED``; another: ``OTHER_PATIENT``), else None."""
    record = service.find_by_sop_instance_uid(sop, collection=collection)
    if record is None:
        return None
    if _patient(record.patient_id) == patient_id:
        outcome.status = IngestStatus.ALREADY_STORED  # a PACS may send a study again
        return outcome
    outcome.status = IngestStatus.OTHER_PATIENT
    outcome.error = ConflictError(
        f"SOPInstanceUID already stored in collection {collection!r} as image {record.image_id} under "
        "another PatientID (the UID sent again for another patient, or the stored image relabelled on "
        "review); not enrolled again: check which patient it belongs to"
    )
    return outcome


def ingest_instance(
    service: ReidService,
    data: bytes,
    *,
    collection: str,
    point: OperatingPoint,
    rules: InstanceRules = InstanceRules(),
) -> IngestOutcome:
    """Check one DICOM file and enrol it unless it is refused or already there (see the module
    docstring). Exceptions escape only from the already-stored lookup, before any work was done."""
    try:
        ds = read_dicom(data, header_only=True)
        sop_class = _uid(ds, "SOPClassUID")
        if rules.strict_uids:
            sop = _uid(ds, "SOPInstanceUID")
        else:
            sop = str(ds.get("SOPInstanceUID", "") or "").strip() or None
        study = _uid(ds, "StudyInstanceUID")
        modality = str(ds.get("Modality", "") or "").strip().upper()
        patient_id = _patient(ds.get("PatientID", ""))
    except Exception as exc:  # pydicom raises many kinds on what is not DICOM
        return IngestOutcome(IngestStatus.UNREADABLE, error=exc)
    del ds
    outcome = IngestOutcome(IngestStatus.NO_SOP_UIDS, sop_class, sop, modality)
    if sop is None or (rules.strict_uids and sop_class is None):
        return outcome
    if rules.study is not None and study != rules.study:
        outcome.status = IngestStatus.OTHER_STUDY
        return outcome
    if modality not in rules.modalities:
        outcome.status = IngestStatus.OTHER_MODALITY
        return outcome
    if (known := _already(service, outcome, sop, collection, patient_id)) is not None:
        return known
    try:
        decoded, vectors = service.embed_uploads([Upload(f"instance {sop}", data)])
    except ServiceError as exc:  # undecodable pixels, the quality gate, the decode budget, size limits
        outcome.status, outcome.error = IngestStatus.NOT_DECODED, exc
        return outcome
    except Exception as exc:
        outcome.status, outcome.error = IngestStatus.FAILED, exc
        return outcome
    try:
        with _store_lock:
            if (known := _already(service, outcome, sop, collection, patient_id)) is not None:
                return known  # stored meanwhile by another request
            [outcome.result] = service.enrol(
                decoded, vectors, ImageMetadata(collection=collection), point=point
            )
    except GalleryDuplicateError as exc:  # another replica stored it first (PostgreSQL's unique key)
        known = _already(service, outcome, sop, collection, patient_id)
        if known is not None:
            return known
        outcome.status, outcome.error = IngestStatus.NOT_STORED, exc
        return outcome
    except GalleryError as exc:
        outcome.status, outcome.error = IngestStatus.NOT_STORED, exc
        return outcome
    except Exception as exc:
        outcome.status, outcome.error = IngestStatus.FAILED, exc
        return outcome
    outcome.status = IngestStatus.ENROLLED
    return outcome


def refusal(outcome: IngestOutcome, name: str, study: str | None = None) -> Refusal | None:
    """The failure code and reason of ``outcome``, or None when the instance is stored (or already
    was). ``name`` names an instance whose SOPInstanceUID could not be read; ``study`` is the study the
    rules asked for. ``FAILED`` (an unexpected error) raises that error: the caller decides what an
    internal error is in its protocol. ``PROCESSING`` hides the gallery's error, which the caller logs."""
    status, sop, error = outcome.status, outcome.sop_instance_uid, outcome.error
    if status is IngestStatus.UNREADABLE:
        return Refusal(Failure.CANNOT_UNDERSTAND, f"{name} is not a readable DICOM file ({error})")
    if status is IngestStatus.NO_SOP_UIDS:
        return Refusal(
            Failure.CANNOT_UNDERSTAND,
            f"{name} is not a DICOM instance (no valid SOPClassUID and SOPInstanceUID)",
        )
    name = f"instance {sop}"
    if status is IngestStatus.OTHER_STUDY:
        return Refusal(Failure.DATASET_MISMATCH, f"{name} belongs to another study than {study}")
    if status is IngestStatus.OTHER_MODALITY:
        return Refusal(
            Failure.SOP_CLASS_NOT_SUPPORTED,
            f"{name} has Modality {outcome.modality or '(missing)'}; only projection radiographs "
            f"({', '.join(sorted(RADIOGRAPH_MODALITIES))}) are enrolled",
        )
    if status is IngestStatus.OTHER_PATIENT:
        detail = error.detail if isinstance(error, ServiceError) else str(error)
        return Refusal(Failure.DUPLICATE_SOP_INSTANCE, f"{name}: {detail}")
    if status is IngestStatus.NOT_DECODED and isinstance(error, ServiceError):
        # too large, or the decode budget is taken (BusyError: try again later)
        if isinstance(error, (PayloadTooLargeError, UnavailableError)):
            return Refusal(Failure.OUT_OF_RESOURCES, error.detail)
        return Refusal(Failure.CANNOT_UNDERSTAND, error.detail)  # undecodable pixels, the quality gate
    if status is IngestStatus.NOT_STORED:
        if isinstance(error, GalleryFullError):
            return Refusal(Failure.OUT_OF_RESOURCES, str(error))
        if isinstance(error, GalleryValidationError):
            return Refusal(Failure.CANNOT_UNDERSTAND, f"{name}: {error}")
        return Refusal(Failure.PROCESSING, f"{name} could not be stored; see the server log")
    if error is not None:  # IngestStatus.FAILED
        raise error
    return None  # ENROLLED or ALREADY_STORED
