"""A data set to examine, embedded once: what ``cxr-reid audit`` and ``cxr-reid risk`` work on.

A corpus is read from manifests (CSV ``path,patient_id[,split,view,...]``, paths relative to each
CSV's folder) or folders of images (the patient id from the DICOM ``PatientID``; optionally the
split from one folder level). Every readable image is decoded and prepared as the service does
(:func:`app.service.decoding.decode_source`), embedded in batches, and described by a few content facts:

- ``sha256``: the file's bytes (exact copies);
- ``pixel_hash``: the model input quantised to 8 bits (the same picture in another file: re-saved,
  other DICOM tags or transfer syntax);
- ``signature``: the model input shrunk to ``SIGNATURE_SIDE`` squared pixels (near-exact copies:
  re-encoded or rescaled; polarity and typicality checks).

Embeddings are cached under ``cache_dir`` by file content and model id (one shard per
``CACHE_SHARD`` images, written as it goes), so a re-run, or an interrupted run, embeds only what
is new. Memory: about ``4 * dim + SIGNATURE_SIDE ** 2 + 200`` bytes per image, 3.3 KB at 512
dimensions (330 MB for 100k images), plus one batch of decoded images per worker thread.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from app.service.decoding import decode_source, sha256_of
from app.service.enrollment import decode_workers, items_from_folder
from app.service.errors import InvalidInputError
from index._fs import atomic_write
from models.data import ManifestError, read_manifest
from models.imaging.preprocess import Radiograph
from models.net.embedder import Embedder

log = logging.getLogger(__name__)

#: Side of the content signature: 32 x 32 grey levels (1 KB per image).
SIGNATURE_SIDE = 32
#: Images per cache shard: a crash loses at most this many embeddings.
CACHE_SHARD = 2048


class CorpusError(ValueError):
    """The inputs cannot be read as a corpus (missing files, bad manifest, nothing to examine)."""


@dataclass(frozen=True)
class CorpusImage:
    """One image to examine and what its source says about it."""

    path: Path  # absolute
    shown: str  # the path as the manifest gives it (or relative to the folder given)
    patient_id: str | None  # None: unknown (a non-DICOM file of a folder)
    split: str | None
    view: str | None = None
    source: str = ""  # the manifest or folder it came from, as given
    key: str = ""  # the patient's namespaced key ("<set>:<id>"), "" when unknown


@dataclass
class EmbeddedCorpus:
    """A corpus after embedding: one row per image, in input order.

    Rows of images that could not be used (``error`` set) hold zero vectors and are left out of
    every comparison; ``ok`` says which rows are real.
    """

    images: list[CorpusImage]
    vectors: np.ndarray  # (N, dim) float32 unit rows
    signatures: np.ndarray  # (N, SIGNATURE_SIDE**2) uint8
    sha256: list[str]
    pixel_hash: list[str]
    errors: list[str | None]
    model_id: str
    cached: int = 0  # rows that came from the cache

    @property
    def ok(self) -> np.ndarray:
        return np.asarray([e is None for e in self.errors], dtype=bool)

    def __len__(self) -> int:
        return len(self.images)


# --------------------------------------------------------------------------------------------------
# reading the inputs


def _folder_split(relative: Path, level: int | None) -> str | None:
    if level is None:
        return None
    parts = relative.parts[:-1]
    return parts[level] if level < len(parts) else None


def load_corpus(sources: Sequence[str | os.PathLike], *, split_level: int | None = None) -> list[CorpusImage]:
    """Read manifests and folders into one list of images.

    A manifest's ``split`` column gives the split; with several manifests and no such column, each
    manifest's file name (without ``.csv``) is its split (``train.csv``, ``test.csv``). A folder's
    images take their split from folder level ``split_level`` below it (0: its subfolders).
    """
    if not sources:
        raise CorpusError("give at least one manifest or folder")
    images: list[CorpusImage] = []
    manifests = [Path(s) for s in sources if not Path(s).is_dir()]
    for source in sources:
        path = Path(source)
        if path.is_dir():
            root = path.resolve()
            found = items_from_folder(path)
            if not found:
                raise CorpusError(f"{path}: no DICOM, PNG, JPEG or TIFF files under this folder")
            for item in found:
                relative = item.path.relative_to(root)
                images.append(
                    CorpusImage(
                        path=item.path,
                        shown=str(relative),
                        patient_id=None,
                        split=_folder_split(relative, split_level),
                        source=str(source),
                    )
                )
            continue
        try:
            samples = read_manifest(path)
        except ManifestError as exc:
            raise CorpusError(str(exc)) from None
        fallback = path.stem if len(manifests) > 1 and all(s.split is None for s in samples) else None
        root = path.resolve().parent
        for sample in samples:
            prefix = f"{sample.dataset}:"
            patient = sample.patient_id.removeprefix(prefix)
            images.append(
                CorpusImage(
                    path=Path(sample.path),
                    shown=os.path.relpath(sample.path, root),
                    patient_id=patient,
                    split=sample.split or fallback,
                    view=sample.view,
                    source=str(source),
                    key=sample.patient_id,
                )
            )
    missing = [image for image in images if not image.path.is_file()]
    if missing:
        raise CorpusError(
            f"{len(missing)} of {len(images)} image(s) not found, e.g. {missing[0].path} (from "
            f"{missing[0].source}; a manifest's paths are relative to its folder)"
        )
    return images


# --------------------------------------------------------------------------------------------------
# the embedding cache


def _cache_folder(cache_dir: Path, model_id: str) -> Path:
    return cache_dir / re.sub(r"[^A-Za-z0-9._-]", "_", model_id)


def _read_cache(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray, str, str]]:
    """sha256 -> (vector, signature, pixel hash, DICOM PatientID or "") from every readable shard."""
    found: dict[str, tuple[np.ndarray, np.ndarray, str, str]] = {}
    for shard in sorted(folder.glob("part-*.npz")):
        try:
            with np.load(shard, allow_pickle=False) as data:
                rows = zip(
                    data["sha256"],
                    data["vectors"],
                    data["signatures"],
                    data["pixel_hash"],
                    data["tag"],
                    strict=True,
                )
                for sha, vector, signature, pixel, tag in rows:
                    found[str(sha)] = (vector, signature, str(pixel), str(tag))
        except (OSError, ValueError, KeyError) as exc:  # a torn shard costs only its images
            log.warning("ignoring unreadable embedding cache shard %s: %s", shard.name, exc)
    return found


def _write_shard(folder: Path, rows: list[tuple[str, np.ndarray, np.ndarray, str, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    number = len(list(folder.glob("part-*.npz")))
    while (folder / f"part-{number:05d}.npz").exists():
        number += 1
    target = folder / f"part-{number:05d}.npz"

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            np.savez(
                handle,
                sha256=np.asarray([r[0] for r in rows]),
                vectors=np.stack([r[1] for r in rows]).astype(np.float32),
                signatures=np.stack([r[2] for r in rows]).astype(np.uint8),
                pixel_hash=np.asarray([r[3] for r in rows]),
                tag=np.asarray([r[4] for r in rows]),
            )

    atomic_write(target, write)


# --------------------------------------------------------------------------------------------------
# embedding


def signature_of(prepared: np.ndarray) -> np.ndarray:
    """The model input shrunk to SIGNATURE_SIDE squared grey levels (box filter), flattened uint8."""
    small = Image.fromarray(np.asarray(prepared, dtype=np.float32), mode="F").resize(
        (SIGNATURE_SIDE, SIGNATURE_SIDE), Image.Resampling.BOX
    )
    return np.clip(np.asarray(small) * 255.0 + 0.5, 0, 255).astype(np.uint8).reshape(-1)


def pixel_hash_of(prepared: np.ndarray) -> str:
    """Hash of the model input at 8 bits: equal for files holding the same picture."""
    quantised = np.clip(np.asarray(prepared) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return hashlib.sha256(quantised.tobytes()).hexdigest()


def _decode_prepare(embedder: Embedder, data: bytes, max_pixels: int) -> tuple[Radiograph, np.ndarray]:
    """Decode one file as the service does and prepare it as the model sees it."""
    radiograph = decode_source(
        data, max_pixels=max_pixels, name="the file", config=embedder.preprocess_config
    )
    return radiograph, embedder.prepare(radiograph)


@dataclass
class _Row:
    sha: str = ""
    error: str | None = None
    prepared: np.ndarray | None = None
    tag: str = ""


def _chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def embed_corpus(
    embedder: Embedder,
    images: list[CorpusImage],
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    max_pixels: int = 50_000_000,
    progress: bool = True,
    desc: str = "embed",
) -> EmbeddedCorpus:
    """Embed every image (see the module docstring); unusable files are kept with their reason.

    A folder image without a patient id takes the DICOM ``PatientID`` of its file.
    """
    folder = _cache_folder(Path(cache_dir), embedder.model_id) if cache_dir is not None else None
    cache = _read_cache(folder) if folder is not None and folder.is_dir() else {}
    on_disk = set(cache)
    n = len(images)
    vectors = np.zeros((n, embedder.dim), dtype=np.float32)
    signatures = np.zeros((n, SIGNATURE_SIDE**2), dtype=np.uint8)
    shas, pixel_hashes, tags = [""] * n, [""] * n, [""] * n
    errors: list[str | None] = [None] * n
    fresh: list[tuple[str, np.ndarray, np.ndarray, str, str]] = []
    cached = 0

    def read(i: int) -> _Row:
        try:
            data = images[i].path.read_bytes()
        except OSError as exc:
            return _Row(error=f"cannot read: {exc.strerror or exc}")
        row = _Row(sha=sha256_of(data))
        if row.sha in cache:
            return row
        try:
            radiograph, row.prepared = _decode_prepare(embedder, data, max_pixels)
            row.tag = radiograph.identifiers.get("PatientID", "")
        except (InvalidInputError, ValueError) as exc:
            row.error = str(exc).removeprefix("the file: ")
        return row

    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress)
    workers = decode_workers()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="corpus-decode") as pool:
        for chunk in _chunks(n, batch_size * max(1, workers)):
            rows = list(pool.map(read, chunk))
            todo = []
            for i, row in zip(chunk, rows, strict=True):
                shas[i] = row.sha
                if row.error is not None:
                    errors[i] = row.error
                elif row.sha in cache:
                    vectors[i], signatures[i], pixel_hashes[i], tags[i] = cache[row.sha]
                    cached += row.sha in on_disk
                else:
                    todo.append((i, row))
            for part in _chunks(len(todo), batch_size):
                batch = [todo[j] for j in part]
                embedded = embedder.embed_prepared(np.stack([row.prepared for _, row in batch]))
                for (i, row), vector in zip(batch, embedded, strict=True):
                    vectors[i], signatures[i] = vector, signature_of(row.prepared)
                    pixel_hashes[i], tags[i] = pixel_hash_of(row.prepared), row.tag
                    cache[row.sha] = (vectors[i], signatures[i], pixel_hashes[i], row.tag)
                    fresh.append((row.sha, vectors[i], signatures[i], pixel_hashes[i], row.tag))
                if folder is not None and len(fresh) >= CACHE_SHARD:
                    _write_shard(folder, fresh)
                    fresh = []
            bar.update(len(chunk))
    bar.close()
    if folder is not None and fresh:
        _write_shard(folder, fresh)
    for i, image in enumerate(images):
        if image.patient_id is None and tags[i]:
            images[i] = CorpusImage(
                path=image.path,
                shown=image.shown,
                patient_id=tags[i],
                split=image.split,
                view=image.view,
                source=image.source,
                key=f"dicom:{tags[i]}",
            )
    return EmbeddedCorpus(
        images=images,
        vectors=vectors,
        signatures=signatures,
        sha256=shas,
        pixel_hash=pixel_hashes,
        errors=errors,
        model_id=embedder.model_id,
        cached=cached,
    )


def load_for_display(
    image: CorpusImage, embedder: Embedder, side: int = 160, max_pixels: int = 50_000_000
) -> np.ndarray | None:
    """The model's view of one image at ``side`` pixels (uint8), for report thumbnails; None if
    the file is no longer usable."""
    try:
        _, prepared = _decode_prepare(embedder, image.path.read_bytes(), max_pixels)
    except (OSError, InvalidInputError, ValueError):
        return None
    small = Image.fromarray(prepared.astype(np.float32), mode="F").resize(
        (side, side), Image.Resampling.BILINEAR
    )
    return np.clip(np.asarray(small) * 255.0 + 0.5, 0, 255).astype(np.uint8)
