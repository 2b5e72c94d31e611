"""The gallery: FAISS index + SQLite metadata and vectors (numpy only, no torch)."""

from .alerts import ALERT_STATES, AlertNotOpenError, AlertRecord, NewAlert
from .faiss_index import PairLimitError, faiss_build, pairs_above
from .gallery import Gallery, cluster_pairs
from .records import (
    DuplicatePair,
    GalleryError,
    GalleryFullError,
    GalleryIntegrityError,
    GalleryLockedError,
    GalleryModelMismatchError,
    GalleryValidationError,
    ImageMetadata,
    ImageRecord,
    Match,
    NewImage,
)

__all__ = [
    "ALERT_STATES",
    "AlertNotOpenError",
    "AlertRecord",
    "NewAlert",
    "DuplicatePair",
    "PairLimitError",
    "pairs_above",
    "Gallery",
    "GalleryError",
    "GalleryFullError",
    "GalleryIntegrityError",
    "GalleryLockedError",
    "GalleryModelMismatchError",
    "GalleryValidationError",
    "ImageMetadata",
    "ImageRecord",
    "Match",
    "NewImage",
    "cluster_pairs",
    "faiss_build",
]
