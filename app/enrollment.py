"""Bulk jobs on a gallery: enrol a manifest or a folder, and re-embed everything with a new model.

Used by ``cxr-reid enroll`` and ``cxr-reid reindex``; single images over HTTP go through
:class:`app.services.ReidService`, with the same decoding (:func:`app.services.decode_source`) and
the same gallery rows (:func:`app.services.new_image`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from index import Gallery, ImageMetadata, ImageRecord
from models.data import read_manifest
from models.embedder import Embedder
from models.preprocess import sniff_format

from .phi import stored_original
from .services import InvalidInputError, decode_source, new_image, sha256_of

log = logging.getLogger(__name__)

#: Bytes read to recognise an image file by its magic bytes when walking a folder.
SNIFF_BYTES = 512


@dataclass
class EnrolItem:
    """One file to enrol and what the manifest says about it (None: unknown / from DICOM)."""

    path: Path
    patient_id: str | None = None
    view: str | None = None
    split: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class BulkEnrolSummary:
    total: int = 0
    enrolled: int = 0
    skipped: int = 0  # already in the collection (same sha256): resumed runs skip them
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def items_from_manifest(manifest: str | os.PathLike) -> list[EnrolItem]:
    """Rows of a manifest (models.data.read_manifest: paths relative to the CSV's folder).

    The manifest reader namespaces patient ids by their data set ("<set>:<id>"); a gallery keeps
    the ids as the manifest writes them, so that /verify with patient_id "<id>" finds them.
    """
    items = []
    for sample in read_manifest(manifest):
        prefix = f"{sample.dataset}:"
        patient = (
            sample.patient_id[len(prefix) :] if sample.patient_id.startswith(prefix) else sample.patient_id
        )
        tags = {key: str(value) for key, value in sample.extra.items()}
        if sample.offset_days is not None:
            tags["offset_days"] = f"{sample.offset_days:g}"
        if sample.follow_up is not None:
            tags["follow_up"] = f"{sample.follow_up:g}"
        items.append(EnrolItem(Path(sample.path), patient, sample.view, sample.split, tags))
    return items


def is_image_file(path: Path) -> bool:
    """DICOM / PNG / JPEG / TIFF by magic bytes (DICOM files often have no extension)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(SNIFF_BYTES)
    except OSError:
        return False
    return sniff_format(head) is not None


def items_from_folder(folder: str | os.PathLike) -> list[EnrolItem]:
    """Every image file under ``folder`` (recursively, hidden files skipped), in path order."""
    root = Path(folder)
    paths = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    return [EnrolItem(p.resolve()) for p in paths if is_image_file(p)]


def items_from_source(source: str | os.PathLike) -> list[EnrolItem]:
    """A manifest CSV or a folder of images."""
    path = Path(source)
    if path.is_dir():
        return items_from_folder(path)
    if path.is_file():
        return items_from_manifest(path)
    raise FileNotFoundError(f"no such manifest or folder: {path}")


def bulk_enrol(
    embedder: Embedder,
    gallery: Gallery,
    items: Iterable[EnrolItem],
    *,
    collection: str = "default",
    copy: bool = False,
    batch_size: int = 32,
    max_pixels: int = 50_000_000,
    progress: bool = True,
    skip_existing: bool = True,
) -> BulkEnrolSummary:
    """Enrol files batch by batch; each committed batch is durable, so an interrupted run resumes.

    Files whose sha256 is already in the collection are skipped (that is what makes a rerun
    resume), as are repeats of one file within the run; ``skip_existing=False`` enrols every file
    (an audit must see byte-identical copies in two splits). Unreadable or undecodable files are
    reported and skipped; the rest still go in. ``copy`` stores the originals in the gallery (like
    HTTP uploads) instead of referencing their paths.
    """
    items = list(items)
    summary = BulkEnrolSummary(total=len(items))
    seen: set[str] = set()
    batch: list[tuple[EnrolItem, str, bytes | None, dict[str, str], np.ndarray]] = []

    def flush() -> None:
        if not batch:
            return
        vectors = embedder.embed_prepared(np.stack([prepared for *_, prepared in batch]))
        images = []
        for item, sha, data, identifiers, _ in batch:
            meta = ImageMetadata(
                patient_id=item.patient_id,
                collection=collection,
                view=item.view,
                split=item.split,
                tags=item.tags,
            )
            images.append(
                new_image(
                    identifiers,
                    meta,
                    sha256=sha,
                    blob=stored_original(data, radiograph.source_format) if copy else None,
                    source_path=None if copy else str(item.path),
                )
            )
        gallery.add(vectors, images)
        summary.enrolled += len(batch)
        batch.clear()

    with tqdm(items, desc="enrol", unit="img", disable=not progress) as bar:
        for item in bar:
            try:
                data = item.path.read_bytes()
            except OSError as exc:
                summary.failed.append((str(item.path), f"cannot read: {exc.strerror or exc}"))
                continue
            sha = sha256_of(data)
            if skip_existing and (
                sha in seen or gallery.find_by_sha256(sha, collection=collection) is not None
            ):
                summary.skipped += 1
                continue
            try:
                radiograph = decode_source(
                    data, max_pixels=max_pixels, name=f"'{item.path}'", config=embedder.preprocess_config
                )
                prepared = embedder.prepare(radiograph)
            except (InvalidInputError, ValueError) as exc:
                summary.failed.append((str(item.path), str(exc)))
                continue
            seen.add(sha)
            batch.append((item, sha, data if copy else None, dict(radiograph.identifiers), prepared))
            if len(batch) >= batch_size:
                flush()
        flush()
    for path, reason in summary.failed:
        log.warning("not enrolled: %s (%s)", path, reason)
    return summary


def reindex_gallery(
    embedder: Embedder,
    gallery: Gallery,
    *,
    batch_size: int = 32,
    max_pixels: int = 50_000_000,
    progress: bool = True,
) -> int:
    """Re-embed every stored image with ``embedder`` from its stored or referenced original.

    Resumable (the gallery stages finished batches). An original that can no longer be read stops
    the run with its image id, so it can be restored or deleted before running again.
    """

    def embed_records(records: list[ImageRecord]) -> np.ndarray:
        prepared = []
        for record in records:
            path = record.stored_path or record.source_path
            if path is None:
                raise InvalidInputError(f"image {record.image_id} has no stored or referenced original")
            name = f"image {record.image_id} ('{path}')"
            try:
                radiograph = decode_source(
                    path, max_pixels=max_pixels, name=name, config=embedder.preprocess_config
                )
                prepared.append(embedder.prepare(radiograph))
            except ValueError as exc:
                raise InvalidInputError(str(exc)) from None
        return embedder.embed_prepared(np.stack(prepared))

    with tqdm(total=len(gallery), desc="reindex", unit="img", disable=not progress) as bar:
        return gallery.reindex(embed_records, model_id=embedder.model_id, batch_size=batch_size, progress=bar)
