"""Images in: uploads, the decode budget that bounds memory, and the one decoding path
(:func:`decode_source`) every route, the bulk enrolment and the audit share."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from app.service.errors import BusyError, InvalidInputError, PayloadTooLargeError
from app.settings import MIB
from index import (
    ImageMetadata,
    ImageRecord,
    NewImage,
)
from models.imaging.preprocess import (
    DECODE_BYTES_PER_PIXEL,
    ImageDecodeError,
    PreprocessConfig,
    Radiograph,
    check_usable,
    decode_image,
    header_pixels,
    prepare,
)

log = logging.getLogger(__name__)

#: DICOM identifiers a client may see: never names, birth dates or (from /embed) the PatientID.
PUBLIC_IDENTIFIERS = ("SOPInstanceUID", "StudyInstanceUID", "ViewPosition")


@dataclass
class Upload:
    """Bytes a client sent, with the name it gave them (for messages only)."""

    filename: str
    data: bytes


@dataclass
class QueryImage:
    """One side of a comparison: an upload (embedded now) or a gallery image (its stored vector)."""

    vector: np.ndarray
    key: str  # whose neighbours normalise its scores: record_key() of a gallery image, "" for an upload
    filename: str | None = None
    record: ImageRecord | None = None


@dataclass
class DecodedImage:
    """An upload after decoding: the model input and what the answers need, not the full-resolution
    pixels (they are released as soon as the image is prepared, so a request holds kilobytes)."""

    filename: str
    data: bytes
    sha256: str
    prepared: np.ndarray  # the model input, (size, size) float32
    height: int
    width: int
    source_format: str
    identifiers: dict[str, str]

    def public_identifiers(self) -> dict[str, str]:
        return {k: v for k, v in self.identifiers.items() if k in PUBLIC_IDENTIFIERS}


class DecodeBudget:
    """Bytes of decoded pixels all requests may hold at once (``CXR_REID_MAX_DECODE_MB``).

    Each image reserves what its header says decoding will take (``DECODE_BYTES_PER_PIXEL`` per
    pixel) before a pixel is decoded, and gives it back once prepared; a request waits up to
    ``wait_seconds`` for room, then gets a :class:`~app.service.errors.BusyError` (worth retrying
    after its ``retry_after``). Any mix of legal requests therefore stays under the ceiling, instead
    of each one decoding as it pleases until the process is killed.
    """

    def __init__(self, capacity_bytes: int, wait_seconds: float) -> None:
        self.capacity = capacity_bytes
        self.wait_seconds = wait_seconds
        self.in_use = 0
        self.peak = 0
        self._room = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, nbytes: int, name: str) -> Iterator[None]:
        if nbytes > self.capacity:
            raise PayloadTooLargeError(
                f"{name} would take about {nbytes / MIB:,.0f} MiB to decode, more than this server's "
                f"decode budget of {self.capacity / MIB:,.0f} MiB (CXR_REID_MAX_DECODE_MB); send a "
                "smaller image"
            )
        with self._room:
            if not self._room.wait_for(lambda: self.in_use + nbytes <= self.capacity, self.wait_seconds):
                raise BusyError(
                    "too many large images are being decoded right now; try again shortly",
                    retry_after=max(1, round(self.wait_seconds)),
                )
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._room:
                self.in_use -= nbytes
                self._room.notify_all()


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_source(
    source: bytes | str | os.PathLike, *, max_pixels: int, name: str, config: PreprocessConfig | None = None
) -> Radiograph:
    """Decode one file or upload (at the resolution ``config`` needs) and pass it through the quality
    gate; any unusable input becomes :class:`InvalidInputError` naming it."""
    if isinstance(source, bytes) and not source:
        raise InvalidInputError(f"{name}: the file is empty")
    try:
        radiograph = decode_image(source, max_pixels=max_pixels, config=config)
        check_usable(radiograph, "the image data" if isinstance(source, bytes) else f"'{source}'")
        return radiograph
    except ImageDecodeError as exc:
        raise InvalidInputError(f"{name}: {exc}") from None


def decode_uploads(
    uploads: Sequence[Upload],
    *,
    max_pixels: int,
    config: PreprocessConfig,
    budget: DecodeBudget | None = None,
) -> list[DecodedImage]:
    """Decode and prepare every upload first, so a request with one bad file changes nothing; each
    decode runs inside the budget's reservation for it."""
    out = []
    for upload in uploads:
        name = f"'{upload.filename}'"
        need = (header_pixels(upload.data) or 0) * DECODE_BYTES_PER_PIXEL
        with budget.reserve(need, name) if budget is not None else contextlib.nullcontext():
            radiograph = decode_source(upload.data, max_pixels=max_pixels, name=name, config=config)
            try:
                prepared = prepare(radiograph, config)
            except ImageDecodeError as exc:
                raise InvalidInputError(f"{name}: {exc}") from None
            height, width = radiograph.shape
            kind, identifiers = radiograph.source_format, dict(radiograph.identifiers)
            del radiograph
        out.append(
            DecodedImage(
                upload.filename,
                upload.data,
                sha256_of(upload.data),
                prepared,
                height,
                width,
                kind,
                identifiers,
            )
        )
    return out


def new_image(
    identifiers: dict[str, str],
    meta: ImageMetadata,
    *,
    sha256: str,
    blob: bytes | None = None,
    source_path: str | None = None,
) -> NewImage:
    """The gallery row for an image: the caller's metadata first, its DICOM identifiers for the gaps."""
    ids = identifiers
    return NewImage(
        patient_id=meta.patient_id if meta.patient_id is not None else ids.get("PatientID"),
        collection=meta.collection,
        sop_instance_uid=meta.sop_instance_uid or ids.get("SOPInstanceUID"),
        study_instance_uid=meta.study_instance_uid or ids.get("StudyInstanceUID"),
        view=meta.view or ids.get("ViewPosition"),
        study_date=meta.study_date or ids.get("StudyDate"),
        split=meta.split,
        tags=dict(meta.tags),
        source_path=source_path,
        blob=blob,
        sha256=sha256,
    )
