"""Gallery records and errors: plain dataclasses so the service can turn them into JSON with asdict()."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timezone


def now_iso() -> str:
    """The current time as the gallery stores it: ISO-8601 UTC, milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")  # noqa: UP017 (py3.10)


class GalleryError(Exception):
    """Base class of every error the gallery raises on purpose."""


class GalleryValidationError(GalleryError, ValueError):
    """The caller passed something the gallery cannot store or search with (bad vector, bad field)."""


class GalleryModelMismatchError(GalleryError):
    """The stored vectors come from another embedding model; they must be re-embedded first."""


class GalleryLockedError(GalleryError):
    """Another process already has this data directory open for writing."""


class GalleryFullError(GalleryError):
    """The data dir's disk is full: the write was rolled back, nothing of it was kept."""


class GalleryNotFoundError(GalleryError):
    """No gallery in the data dir, and the caller may not start one there (a command that only reads
    or repairs a gallery): nothing was created."""


class GalleryUnavailableError(GalleryError):
    """The gallery's database cannot be reached right now (restarting, network): nothing of the
    request was kept, and the same request may simply be sent again."""


class ModelSwitchingError(GalleryUnavailableError):
    """Stored vectors of another model than this process embeds with were read: a reindex just
    switched the gallery (in another process) and this one switches within moments. Nothing was
    answered from them; the same request may be sent again."""


class GalleryDuplicateError(GalleryError):
    """Another writer stored the same DICOM instance in the collection first (the database's unique
    key decided): nothing of this write was kept; look the stored one up instead."""


class GalleryIntegrityError(GalleryError):
    """The data dir cannot be trusted as it is: its database is missing while stored data is there,
    or the database fails SQLite's integrity check. Nothing is created or changed over it."""


#: The longest patient id, collection or other label the gallery stores.
MAX_LABEL_CHARS = 256


def clean_label(value: str | None) -> str | None:
    """The one rule for a patient id, collection or other label, whatever its source (an API form
    or query field, a DICOM PatientID, a manifest, PACS sync): stripped, and an empty value means
    "not given" (None); refused (ValueError saying why, to follow the field's name) when only
    whitespace, over 256 characters, holding control characters or undecodable bytes (U+FFFD), so
    that what is stored is what was meant, and every stored id can be named again in a query or a
    path (``DELETE /patients/{id}``)."""
    if value is None:
        return None
    label = value.strip()
    if not label:
        if value:
            raise ValueError("is only whitespace: give a value, or leave the field out")
        return None
    if len(label) > MAX_LABEL_CHARS:
        raise ValueError(f"is {len(label):,} characters long; at most {MAX_LABEL_CHARS}")
    if "\ufffd" in label:
        raise ValueError("is not valid UTF-8")
    if any(unicodedata.category(char) in ("Cc", "Cs") for char in label):
        raise ValueError("contains control characters (e.g. NUL, tab, newline)")
    return label


def checked_patient_id(value: str | None, *, source: str = "patient_id") -> str | None:
    """:func:`clean_label` for a patient id about to be stored: ``GalleryValidationError`` naming
    ``source`` (e.g. "'x.dcm': the DICOM PatientID") and the reason when it fails; nothing is stored."""
    try:
        return clean_label(value)
    except ValueError as exc:
        raise GalleryValidationError(f"{source} {exc}; nothing was stored") from None


@dataclass(kw_only=True)
class ImageMetadata:
    """What is known of an image besides its pixels: declared once, for what a client enrols, what
    the gallery stores and what it returns."""

    patient_id: str | None = None  # None = unknown identity (searchable, never "same patient" by label)
    collection: str = "default"
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    view: str | None = None
    study_date: str | None = None
    split: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


#: The optional text fields of ImageMetadata (stored as given, or NULL).
METADATA_TEXT_FIELDS = ("sop_instance_uid", "study_instance_uid", "view", "study_date", "split")


@dataclass(kw_only=True)
class NewImage(ImageMetadata):
    """What a caller enrols; the vector travels next to it in ``Gallery.add``."""

    source_path: str | None = None  # external original (bulk enrol); None when `blob` is given
    blob: bytes | None = None  # the original to keep, stored under data_dir/images/<its sha256>
    sha256: str | None = None  # of what the client sent; computed from `blob` when omitted


@dataclass(kw_only=True)
class ImageRecord(ImageMetadata):
    """A stored image: its metadata plus what the gallery assigned and where the original is."""

    image_id: int
    model_id: str  # embedding model that produced this row's vector
    created_at: str  # ISO-8601, UTC
    stored_path: str | None = None  # absolute path of the stored blob, None when only source_path is known
    source_path: str | None = None
    sha256: str | None = None


@dataclass
class Match:
    """One search hit; score is the cosine similarity (inner product of unit vectors)."""

    record: ImageRecord
    score: float


@dataclass
class DuplicatePair:
    """Two images whose similarity reaches the threshold; a.image_id < b.image_id."""

    a: ImageRecord
    b: ImageRecord
    score: float
    conflict: bool  # both patient ids known and different: one of the labels is probably wrong
