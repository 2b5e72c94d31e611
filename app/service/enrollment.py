"""Bulk jobs on a gallery: enrol a manifest or a folder, and re-embed everything with a new model.

Used by ``cxr-reid enroll`` and ``cxr-reid reindex``; single images over HTTP go through
:class:`app.service.reid.ReidService`, with the same decoding (:func:`app.service.decoding.decode_source`) and
the same gallery rows (:func:`app.service.decoding.new_image`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from app.service.decoding import decode_source, new_image, sha256_of
from app.service.errors import InvalidInputError
from app.service.phi import stored_original
from app.service.reid import labelled_image
from index import Gallery, GalleryValidationError, ImageMetadata, ImageRecord
from models.data import read_manifest
from models.imaging.preprocess import sniff_format
from models.net.embedder import Embedder

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


class EnrolmentInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`bulk_enrol`: ``summary`` counts what was committed before it (kept; a rerun
    skips those files and resumes). Still a KeyboardInterrupt, so a caller that does not look stops."""

    def __init__(self, summary: BulkEnrolSummary) -> None:
        super().__init__(f"interrupted after {summary.enrolled} image(s) were enrolled")
        self.summary = summary


@contextlib.contextmanager
def _ctrl_c_after_block() -> Iterator[None]:
    """Ctrl-C (SIGINT) during the block is held until it ends, then raised: a batch committed to the
    gallery is also counted, so "N image(s) enrolled and kept" is what the gallery holds. Only in the
    main thread, where Python lets a handler be set; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


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


def decode_workers() -> int:
    """Threads that read and decode files for the bulk jobs: one per core (at most 32, each holds one
    decoded image), so a many-core GPU machine keeps its GPU fed."""
    return max(1, min(32, os.cpu_count() or 1))


@dataclass
class _Decoded:
    """One file after its worker thread: ready to embed, already enrolled, or failed with a reason."""

    item: EnrolItem
    sha: str = ""
    error: str | None = None
    data: bytes | None = None  # dropped after decoding unless the original is stored (--copy)
    source_format: str = ""
    identifiers: dict[str, str] = field(default_factory=dict)
    prepared: np.ndarray | None = None


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
    batch: list[_Decoded] = []

    def flush() -> None:
        if not batch:
            return
        vectors = embedder.embed_prepared(np.stack([done.prepared for done in batch]))
        images, keep = [], []
        for row, done in enumerate(batch):
            item = done.item
            meta = ImageMetadata(
                patient_id=item.patient_id,
                collection=collection,
                view=item.view,
                split=item.split,
                tags=item.tags,
            )
            image = new_image(
                done.identifiers,
                meta,
                sha256=done.sha,
                blob=stored_original(done.data, done.source_format) if copy else None,
                source_path=None if copy else str(item.path),
            )
            try:  # a manifest's patient id or a DICOM PatientID the gallery cannot take: this file only
                images.append(labelled_image(image, meta, name=f"'{item.path}'"))
            except GalleryValidationError as exc:
                summary.failed.append((str(item.path), str(exc)))
                continue
            keep.append(row)
        with _ctrl_c_after_block():  # committed and counted together: the count Ctrl-C reports is exact
            if images:
                gallery.add(vectors[keep], images)
            summary.enrolled += len(images)
        batch.clear()

    def read(item: EnrolItem) -> _Decoded:
        try:
            data = item.path.read_bytes()
        except OSError as exc:
            return _Decoded(item, error=f"cannot read: {exc.strerror or exc}")
        return _Decoded(item, sha=sha256_of(data), data=data)

    def decode(done: _Decoded) -> _Decoded:
        try:
            radiograph = decode_source(
                done.data,
                max_pixels=max_pixels,
                name=f"'{done.item.path}'",
                config=embedder.preprocess_config,
            )
            done.prepared = embedder.prepare(radiograph)
        except (InvalidInputError, ValueError) as exc:
            done.error = str(exc)
            return done
        done.source_format, done.identifiers = radiograph.source_format, dict(radiograph.identifiers)
        if not copy:
            done.data = None
        return done

    # Files are read, hashed and decoded on worker threads (file I/O, hashlib, the codecs and numpy
    # release the GIL), a batch at a time so memory stays bounded. The gallery is asked which files
    # it already holds on this thread, between reading and decoding, so a resumed run decodes only
    # what is new.
    try:
        with (
            tqdm(total=len(items), desc="enrol", unit="img", disable=not progress) as bar,
            ThreadPoolExecutor(max_workers=decode_workers()) as pool,
        ):
            for start in range(0, len(items), batch_size):
                new = []
                for done in pool.map(read, items[start : start + batch_size]):
                    if done.error is not None:
                        summary.failed.append((str(done.item.path), done.error))
                    elif skip_existing and (
                        done.sha in seen
                        or gallery.find_by_sha256(done.sha, collection=collection) is not None
                    ):
                        summary.skipped += 1
                    else:
                        seen.add(done.sha)
                        new.append(done)
                bar.update(min(batch_size, len(items) - start) - len(new))
                for done in pool.map(decode, new):
                    bar.update(1)
                    if done.error is not None:
                        summary.failed.append((str(done.item.path), done.error))
                    else:
                        batch.append(done)
                if len(batch) >= batch_size:
                    flush()
            flush()
    except KeyboardInterrupt as exc:  # the batches committed so far are kept: say how many
        raise EnrolmentInterrupted(summary) from exc
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
    switch: bool = True,
) -> int:
    """Re-embed every stored image with ``embedder`` from its stored or referenced original.

    Resumable (the gallery stages finished batches). An original that can no longer be read stops
    the run with its image id, so it can be restored or deleted before running again. ``switch``
    False stages the new vectors only (the gallery keeps serving the old ones): a later run
    embeds what was enrolled meanwhile and switches.
    """

    def prepare(record: ImageRecord) -> np.ndarray:
        path = record.stored_path or record.source_path
        if path is None:
            raise InvalidInputError(f"image {record.image_id} has no stored or referenced original")
        name = f"image {record.image_id} ('{path}')"
        try:
            radiograph = decode_source(
                path, max_pixels=max_pixels, name=name, config=embedder.preprocess_config
            )
            return embedder.prepare(radiograph)
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None

    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:

        def embed_records(records: list[ImageRecord]) -> np.ndarray:
            return embedder.embed_prepared(np.stack(list(pool.map(prepare, records))))

        with tqdm(total=len(gallery), desc="reindex", unit="img", disable=not progress) as bar:
            return gallery.reindex(
                embed_records, model_id=embedder.model_id, batch_size=batch_size, progress=bar, switch=switch
            )
