"""The gallery: FAISS index + SQLite metadata and vectors (numpy only, no torch)."""

from .faiss_index import faiss_build
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
    "DuplicatePair",
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
