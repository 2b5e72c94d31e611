"""DICOMweb STOW-RS receive: a modality or a PACS stores radiographs in the gallery (issue 13).

``POST /dicomweb/studies`` (and ``/dicomweb/studies/{study}``) takes a ``multipart/related;
type="application/dicom"`` body, one DICOM instance per part, and enrols each instance on its own,
filed under the PatientID, StudyInstanceUID, SOPInstanceUID and ViewPosition of its tags. The
answer is the STOW-RS response dataset (PS3.18 10.5.3) as DICOM JSON:

* ``ReferencedSOPSequence``: the instances stored, and those already in the collection (same
  SOPInstanceUID: not enrolled again, so a PACS may re-send a study; such an item's ``TextValue`` is
  ``already in the collection``). A wrong-patient alert raised
  by an instance's enrolment is put in the item's ``TextValue`` (0040,A160), prefixed
  ``wrong-patient alert (<kind>):``; PS3.18 defines no attribute for it, TextValue is the plain
  text attribute a DICOM reader shows as such, and a STOW client that does not know it ignores it.
* ``FailedSOPSequence``: the instances refused, each with a ``FailureReason`` code (PS3.18 table
  10.5.3-2, ``FAILURE_*`` below) and the reason in words, again in ``TextValue``.

Status: 200 every instance stored (or already there), 202 some failed, 409 none stored; a request
that cannot be read at all gets the service's JSON error (400 broken multipart, 413 too large, 415
not DICOM). The body is read as it streams in, within the request body limit
(``CXR_REID_MAX_UPLOAD_BYTES``, enforced by ``BodyLimitMiddleware``), by python-multipart's parser;
at most ``CXR_REID_MAX_FILES`` instances are kept, the rest fail with 0xA700 (send them again in
another request). A body of more than :func:`part_limit` parts (``PART_LIMIT``, 1,024, or
``CXR_REID_MAX_FILES`` if that is larger) is refused whole with 413 as soon as the part past the
limit begins, before anything is stored or answered per part: a body of many tiny parts costs
milliseconds, not a response item each (python-multipart bounds each header line itself: 400).
Storing and building the answer run in the thread pool, never on the event loop.

An instance whose SOPInstanceUID is already in the collection under another PatientID (the PACS
re-used the UID or changed the patient, or a reviewer relabelled the stored image) is not enrolled
again and fails with ``FAILURE_DUPLICATE_SOP_INSTANCE`` (0x0111, "duplicate SOP instance", PS3.7
annex C) and the reason in words, instead of being reported as stored.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from app.api.dependencies import AccessDep, Label, ServiceDep, SettingsDep, require_scope
from app.api.schemas import error_responses
from app.service.clientargs import ALL_COLLECTIONS
from app.service.errors import InvalidInputError
from app.service.ingest import (
    ALREADY_STORED_TEXT,
    Failure,
    IngestOutcome,
    IngestStatus,
    InstanceRules,
    ingest_instance,
    refusal,
)
from app.service.reid import ReidService
from app.settings import Settings
from models.scoring.decide import OperatingPoint

log = logging.getLogger(__name__)

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

DICOM_JSON = "application/dicom+json"
DICOM = "application/dicom"

#: FailureReason codes (PS3.18 table 10.5.3-2): app.service.ingest.Failure, the table the C-STORE SCP
#: answers from too; 0xA700 also for instances past the count of one request.
FAILURE_OUT_OF_RESOURCES = int(Failure.OUT_OF_RESOURCES)
FAILURE_DATASET_MISMATCH = int(Failure.DATASET_MISMATCH)
FAILURE_CANNOT_UNDERSTAND = int(Failure.CANNOT_UNDERSTAND)
FAILURE_PROCESSING = int(Failure.PROCESSING)
FAILURE_SOP_CLASS_NOT_SUPPORTED = int(Failure.SOP_CLASS_NOT_SUPPORTED)
FAILURE_DUPLICATE_SOP_INSTANCE = int(Failure.DUPLICATE_SOP_INSTANCE)

#: Parts one request may hold (stored, or failed with 0xA700 past ``CXR_REID_MAX_FILES``); a body
#: with more is refused whole with 413 (:func:`part_limit`). Bounds the response and the work per
#: request whatever the body limit: 400,000 empty parts fit in 4 MB.
PART_LIMIT = 1024

#: RFC 2046 allows 70 characters, but Orthanc's DICOMweb plugin sends 73 (two UUIDs): be lenient.
MAX_BOUNDARY = 200


@dataclass
class Part:
    """One body part: its headers (lower-case names) and bytes."""

    headers: dict[str, str] = field(default_factory=dict)
    data: bytes = b""


@dataclass
class Outcome:
    """What became of one instance: stored (``failure`` None) or refused, in the response's terms."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    failure: int | None = None
    text: str | None = None


def part_limit(settings: Settings) -> int:
    """Parts one STOW-RS request may hold: ``PART_LIMIT``, or ``CXR_REID_MAX_FILES`` if larger."""
    return max(PART_LIMIT, settings.max_files)


class TooManyPartsError(Exception):
    """Raised from the parser's callbacks: the body passed a limit; nothing per part is built."""


class _Collector:
    """python-multipart callbacks that gather parts, keeping at most ``max_parts`` parts' bytes and
    raising :class:`TooManyPartsError` when the part past ``part_limit`` begins."""

    def __init__(self, max_parts: int, part_limit: int | None = None) -> None:
        self.max_parts = max_parts
        self.part_limit = max(max_parts, part_limit or max_parts)
        self.seen = 0
        self.parts: list[Part] = []
        self.dropped = 0
        self.ended = False
        self._data = bytearray()
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[str, str] = {}

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    @property
    def keeping(self) -> bool:
        return len(self.parts) < self.max_parts

    def _begin(self) -> None:
        self.seen += 1
        if self.seen > self.part_limit:
            raise TooManyPartsError(
                f"the multipart/related body has more than {self.part_limit:,} parts: at most "
                f"{self.max_parts:,} instances are stored per request (CXR_REID_MAX_FILES); send them "
                "in several requests"
            )
        self._data = bytearray()
        self._headers = {}

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self._headers[name] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.keeping:
            self._data.extend(data[start:end])

    def _part_end(self) -> None:
        if self.keeping:
            self.parts.append(Part(self._headers, bytes(self._data)))
        else:
            self.dropped += 1
        self._data = bytearray()

    def _end(self) -> None:
        self.ended = True


def _boundary(content_type: str | None) -> bytes:
    """The multipart boundary of a STOW-RS request; 415 for another media type, 400 without one."""
    if not content_type:
        raise HTTPException(
            status_code=415,
            detail=f'missing Content-Type: send multipart/related; type="{DICOM}"; boundary=...',
        )
    media, params = parse_options_header(content_type)
    if media.decode("latin-1").lower() != "multipart/related":
        raise HTTPException(
            status_code=415,
            detail=f"Content-Type {media.decode('latin-1')!r} is not accepted: STOW-RS here takes "
            f'multipart/related; type="{DICOM}" (one DICOM instance per part)',
        )
    kind = params.get(b"type", DICOM.encode()).decode("latin-1").lower()
    if kind != DICOM:
        raise HTTPException(
            status_code=415,
            detail=f'multipart/related of type "{kind}" is not accepted: only type="{DICOM}" '
            "(whole DICOM instances; not metadata with bulk data)",
        )
    boundary = params.get(b"boundary", b"")
    if not boundary or len(boundary) > MAX_BOUNDARY:
        raise HTTPException(
            status_code=400, detail="the multipart/related Content-Type has no (valid) boundary parameter"
        )
    return boundary


async def _read_parts(request: Request, boundary: bytes, max_parts: int, limit: int) -> _Collector:
    """Parse the body as it streams in; the body limit middleware stops it past the upload limit, and
    the part past ``limit`` stops it with 413 (the rest of the body is discarded unread by the server)."""
    collector = _Collector(max_parts, limit)
    parser = MultipartParser(boundary, callbacks=collector.callbacks())
    try:
        async for chunk in request.stream():
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except TooManyPartsError as exc:
        raise HTTPException(status_code=413, detail=str(exc)) from None
    except MultipartParseError as exc:
        raise HTTPException(
            status_code=400, detail=f"the multipart/related body cannot be parsed: {exc}"
        ) from None
    if not collector.ended:
        raise HTTPException(
            status_code=400,
            detail="the multipart/related body ends before its closing boundary "
            "(truncated, or the wrong boundary)",
        )
    if not collector.parts:
        raise HTTPException(status_code=400, detail="the multipart/related body holds no DICOM instance")
    return collector


def _store_one(
    service: ReidService, index: int, part: Part, *, collection: str, study: str | None, point: OperatingPoint
) -> Outcome:
    """Check, embed and enrol one instance (:func:`ingest_instance`); every refusal becomes a failed
    Outcome, never an error."""
    name = f"instance {index + 1}"
    part_type = part.headers.get("content-type")
    if part_type and parse_options_header(part_type)[0].decode("latin-1").lower() != DICOM:
        return Outcome(
            None, None, FAILURE_CANNOT_UNDERSTAND, f"{name} has Content-Type {part_type!r}, not {DICOM}"
        )
    rules = InstanceRules(study=study, strict_uids=True)  # the answer names both SOP UIDs
    done = ingest_instance(service, part.data, collection=collection, point=point, rules=rules)
    return _outcome(done, name, study)


def _outcome(done: IngestOutcome, name: str, study: str | None) -> Outcome:
    """An ingest outcome in STOW-RS terms: the FailureReason code and reason of
    :func:`app.service.ingest.refusal`, or the wrong-patient alert of a stored instance. An unexpected
    error is raised (the request's 500)."""
    refused = refusal(done, name, study)
    if refused is not None:
        if refused.code is Failure.PROCESSING:
            log.error("STOW-RS: instance %s could not be stored: %s", done.sop_instance_uid, done.error)
        return Outcome(done.sop_class_uid, done.sop_instance_uid, int(refused.code), refused.reason)
    if done.status is IngestStatus.ALREADY_STORED:
        return Outcome(done.sop_class_uid, done.sop_instance_uid, text=ALREADY_STORED_TEXT)
    result = done.result
    alert = result.alert if result is not None else None
    if result is None or alert is None:
        return Outcome(done.sop_class_uid, done.sop_instance_uid)
    # the kind and ids only: the message names patients, which stay out of logs
    log.warning(
        "STOW-RS: wrong-patient alert %s on image %d (instance %s)",
        alert.kind,
        result.record.image_id,
        done.sop_instance_uid,
    )
    return Outcome(
        done.sop_class_uid,
        done.sop_instance_uid,
        text=f"wrong-patient alert ({alert.kind}): {alert.message}",
    )


def _store_all(
    service: ReidService,
    collector: _Collector,
    settings: Settings,
    *,
    collection: str,
    study: str | None,
    point: OperatingPoint,
) -> list[Outcome]:
    outcomes = []
    for index in range(len(collector.parts)):
        part = collector.parts[index]
        outcomes.append(_store_one(service, index, part, collection=collection, study=study, point=point))
        collector.parts[index] = Part()  # its bytes are no longer needed
    outcomes += [
        Outcome(
            None,
            None,
            FAILURE_OUT_OF_RESOURCES,
            f"instance {settings.max_files + n + 1} of the request: at most {settings.max_files} instances "
            "are taken in one request (CXR_REID_MAX_FILES); send the rest in another",
        )
        for n in range(collector.dropped)
    ]
    return outcomes


def response_dataset(outcomes: list[Outcome]) -> dict[str, Any]:
    """The STOW-RS response dataset (DICOM JSON) of these outcomes."""
    from pydicom.dataset import Dataset

    referenced, failed = [], []
    for outcome in outcomes:
        item = Dataset()
        if outcome.sop_class_uid:
            item.ReferencedSOPClassUID = outcome.sop_class_uid
        if outcome.sop_instance_uid:
            item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
        if outcome.failure is not None:
            item.FailureReason = outcome.failure
        if outcome.text:
            item.TextValue = outcome.text
        (referenced if outcome.failure is None else failed).append(item)
    ds = Dataset()
    if referenced:
        ds.ReferencedSOPSequence = referenced
    if failed:
        ds.FailedSOPSequence = failed
    return ds.to_json_dict()


def _status(outcomes: list[Outcome]) -> int:
    failed = sum(outcome.failure is not None for outcome in outcomes)
    return 200 if not failed else 409 if failed == len(outcomes) else 202


def _store_and_answer(
    service: ReidService,
    collector: _Collector,
    settings: Settings,
    *,
    collection: str,
    study: str | None,
    point: OperatingPoint,
) -> tuple[bytes, int]:
    """Store every kept instance and build the answer's body and status (run in the thread pool:
    neither may hold the event loop)."""
    outcomes = _store_all(service, collector, settings, collection=collection, study=study, point=point)
    stored = sum(o.failure is None for o in outcomes)
    log.info("STOW-RS: %d instance(s) stored or already there, %d failed", stored, len(outcomes) - stored)
    return json.dumps(response_dataset(outcomes)).encode(), _status(outcomes)


_DATASET_SCHEMA = {
    "type": "object",
    "description": "the STOW-RS response dataset in DICOM JSON (PS3.18 F.2): "
    "00081199 ReferencedSOPSequence, 00081198 FailedSOPSequence; items hold 00081150 / 00081155 "
    "(SOP class / instance UID), 00081197 FailureReason and 0040A160 TextValue (the reason in words, or "
    "a wrong-patient alert)",
}
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "every instance is stored (or was already)",
        "content": {DICOM_JSON: {"schema": _DATASET_SCHEMA}},
    },
    202: {
        "description": "some instances are stored, others failed (FailedSOPSequence says why)",
        "content": {DICOM_JSON: {"schema": _DATASET_SCHEMA}},
    },
    409: {
        "description": "no instance could be stored (FailedSOPSequence says why)",
        "content": {DICOM_JSON: {"schema": _DATASET_SCHEMA}},
    },
    **error_responses(
        400,
        413,
        415,
        e400="the body is not a readable multipart/related message (no boundary, truncated, no parts)",
        e413="the body is over the upload limit (CXR_REID_MAX_UPLOAD_BYTES), or holds more than "
        f"{PART_LIMIT:,} parts (or CXR_REID_MAX_FILES if larger); nothing was stored",
        e415='the body is not multipart/related; type="application/dicom"',
    ),
}
OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "description": 'multipart/related; type="application/dicom": one DICOM instance (a Part 10 '
        "file) per part",
        "content": {"multipart/related": {"schema": {"type": "string", "format": "binary"}}},
    }
}
DESCRIPTION = (
    "DICOMweb STOW-RS (PS3.18): store DICOM instances sent as `multipart/related; "
    'type="application/dicom"`. Each instance is enrolled on its own, under the PatientID, '
    "StudyInstanceUID, SOPInstanceUID and ViewPosition of its tags, in `collection`, with the "
    "wrong-patient check of `POST /images` (against the gallery as it stands, earlier instances of the "
    "same request included). An instance whose SOPInstanceUID is already in the collection is reported "
    "as stored and not enrolled again; under another PatientID it fails with 0x0111 (duplicate SOP "
    "instance: not enrolled again, the reason in TextValue). Instances that are not projection "
    "radiographs (Modality CR, DX, DR, RG), cannot be decoded, or (on `/dicomweb/studies/{study}`) "
    "belong to another study fail on their own.\n\nThe answer is the STOW-RS response dataset in DICOM "
    "JSON: ReferencedSOPSequence (stored), FailedSOPSequence (with FailureReason 0xC000 cannot "
    "understand, 0x0122 not a radiograph, 0xA900 another study, 0xA700 out of resources, 0x0111 stored "
    "under another PatientID, 0x0110 processing failure); each item's TextValue (0040A160) holds a "
    "failure's reason in words, or a stored instance's wrong-patient alert. 200: all stored; 202: some "
    "failed; 409: none stored. At most CXR_REID_MAX_FILES instances are stored per request (the rest "
    f"fail with 0xA700); a body of more than {PART_LIMIT:,} parts (or CXR_REID_MAX_FILES if larger) is "
    "refused whole with 413."
)

CollectionQuery = Annotated[str | None, Query(description="gallery collection to enrol into"), Label]


async def _stow(
    request: Request,
    service: ReidService,
    settings: Settings,
    access: Any,
    collection: str | None,
    study: str | None,
) -> Response:
    if collection is None or collection == ALL_COLLECTIONS:
        raise InvalidInputError("collection must be a non-empty name other than '*'")
    access.collection(collection)
    boundary = _boundary(request.headers.get("content-type"))
    service.ensure_gallery()  # 503 now, before the body is read, when there is no gallery to store in
    point = service.operating_point()
    collector = await _read_parts(request, boundary, settings.max_files, part_limit(settings))
    content, status = await run_in_threadpool(
        _store_and_answer, service, collector, settings, collection=collection, study=study, point=point
    )
    return Response(content=content, status_code=status, media_type=DICOM_JSON)


@router.post(
    "/studies",
    dependencies=[Depends(require_scope("write"))],
    summary="DICOMweb STOW-RS: store DICOM instances (enrol radiographs)",
    description=DESCRIPTION,
    response_class=Response,
    responses=RESPONSES,
    openapi_extra=OPENAPI_BODY,
)
async def stow(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    access: AccessDep,
    collection: CollectionQuery = "default",
) -> Response:
    return await _stow(request, service, settings, access, collection, None)


@router.post(
    "/studies/{study}",
    dependencies=[Depends(require_scope("write"))],
    summary="DICOMweb STOW-RS: store DICOM instances of one study",
    description=DESCRIPTION + " Here every instance must belong to the study `study` (else 0xA900).",
    response_class=Response,
    responses=RESPONSES,
    openapi_extra=OPENAPI_BODY,
)
async def stow_study(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    access: AccessDep,
    study: Annotated[str, Path(description="StudyInstanceUID every instance must belong to")],
    collection: CollectionQuery = "default",
) -> Response:
    return await _stow(request, service, settings, access, collection, study.strip())
