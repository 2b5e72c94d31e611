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
nothing: each caller reports in its own terms (STOW-RS failure codes in the response dataset, the
sync run's counts) and keeps its own log lines, which name alert kinds and ids, never patients.
"""

from __future__ import annotations

import enum
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any

from app.service.decoding import Upload
from app.service.errors import ConflictError, ServiceError
from app.service.reid import ReidService
from app.service.results import EnrolResult
from index import GalleryError, ImageMetadata
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
    except GalleryError as exc:
        outcome.status, outcome.error = IngestStatus.NOT_STORED, exc
        return outcome
    except Exception as exc:
        outcome.status, outcome.error = IngestStatus.FAILED, exc
        return outcome
    outcome.status = IngestStatus.ENROLLED
    return outcome
