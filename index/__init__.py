"""The gallery: FAISS index + SQLite metadata and vectors (numpy only, no torch).

``Gallery`` (index/gallery.py) is the read-write facade, one process at a time; ``GallerySnapshot``
(index/snapshot.py) reads a data dir without lock or FAISS, for offline tools.
"""

from .alerts import ALERT_STATES, AlertNotOpenError, AlertRecord, NewAlert
from .clusters import UnionFind, cluster_pairs
from .faiss_index import PairLimitError, faiss_build, pairs_above
from .gallery import Gallery, holds_gallery
from .originals import OriginalsReport
from .records import (
    MAX_LABEL_CHARS,
    DuplicatePair,
    GalleryDuplicateError,
    GalleryError,
    GalleryFullError,
    GalleryIntegrityError,
    GalleryLockedError,
    GalleryModelMismatchError,
    GalleryNotFoundError,
    GalleryUnavailableError,
    GalleryValidationError,
    ImageMetadata,
    ImageRecord,
    Match,
    ModelSwitchingError,
    NewImage,
    checked_patient_id,
    clean_label,
)
from .snapshot import GallerySnapshot, is_gallery_dir

__all__ = [
    "ALERT_STATES",
    "MAX_LABEL_CHARS",
    "AlertNotOpenError",
    "AlertRecord",
    "NewAlert",
    "DuplicatePair",
    "PairLimitError",
    "pairs_above",
    "Gallery",
    "GalleryDuplicateError",
    "GalleryError",
    "GalleryFullError",
    "GalleryIntegrityError",
    "GalleryLockedError",
    "GalleryModelMismatchError",
    "GalleryNotFoundError",
    "GalleryUnavailableError",
    "ModelSwitchingError",
    "GallerySnapshot",
    "GalleryValidationError",
    "ImageMetadata",
    "ImageRecord",
    "Match",
    "NewImage",
    "OriginalsReport",
    "UnionFind",
    "checked_patient_id",
    "clean_label",
    "cluster_pairs",
    "faiss_build",
    "holds_gallery",
    "is_gallery_dir",
]
