"""What the gallery accepts: the embedding model it is opened with, vectors, and new image rows.

Every check a caller's input goes through before anything is written lives here, so that
``Gallery`` only orders the steps. All of them raise ``GalleryValidationError`` (or, for the model,
``GalleryModelMismatchError`` / ``GalleryError``) and change nothing.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from .records import (
    METADATA_TEXT_FIELDS,
    GalleryError,
    GalleryModelMismatchError,
    GalleryValidationError,
    NewImage,
    checked_patient_id,
)
from .store import Store

log = logging.getLogger(__name__)

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_MIN_NORM = 1e-6
_STR_FIELDS = ("source_path", *METADATA_TEXT_FIELDS)


def check_model(
    store: Store, data_dir: Path, model_id: str, dim: int, *, allow_mismatch: bool
) -> tuple[int, bool]:
    """(dim of the stored vectors, whether they come from another model) for a gallery opened with
    ``model_id``/``dim``. An empty or new gallery takes the model it is opened with. Vectors of
    another model raise ``GalleryModelMismatchError``, unless ``allow_mismatch`` (then the second
    value is True and the gallery refuses search and add until a reindex)."""
    stored_model = store.meta_get("model_id")
    stored_dim = int(store.meta_get("dim") or 0)
    count = store.count()
    if stored_model is None or (count == 0 and (stored_model, stored_dim) != (model_id, dim)):
        if stored_model is not None:
            log.info("empty gallery %s switches from model %s to %s", data_dir, stored_model, model_id)
        with store.write_txn() as conn:
            store.meta_set(conn, "model_id", model_id)
            store.meta_set(conn, "dim", str(dim))
        return dim, False
    if stored_model != model_id:
        msg = (
            f"gallery {data_dir} holds {count} vectors of model {stored_model!r} (dim "
            f"{stored_dim}), not {model_id!r} (dim {dim}): run `cxr-reid reindex` to "
            "re-embed them with the new model"
        )
        if not allow_mismatch:
            raise GalleryModelMismatchError(msg)
        log.warning(
            "%s; opened anyway (allow_model_mismatch): search and add are refused until reindex() completes",
            msg,
        )
        return stored_dim, True
    if stored_dim != dim:
        raise GalleryError(
            f"gallery {data_dir} stores {stored_dim}-d vectors for model "
            f"{stored_model!r} but was opened with dim={dim}"
        )
    return stored_dim, False


def unit_rows(vectors: np.ndarray, dim: int, *, what: str = "vectors") -> np.ndarray:
    """(n, dim) finite, non-zero -> float32 unit rows. Raises GalleryValidationError otherwise."""
    try:
        x = np.asarray(vectors)
    except Exception as exc:
        raise GalleryValidationError(f"{what} is not an array: {exc}") from exc
    if x.ndim != 2 or x.shape[1] != dim:
        raise GalleryValidationError(f"{what} must have shape (n, {dim}), got {x.shape}")
    if x.dtype.kind not in "fiu":
        raise GalleryValidationError(f"{what} must be real numbers, got dtype {x.dtype}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        bad = np.where(~np.isfinite(x).all(axis=1))[0]
        raise GalleryValidationError(f"{what} has non-finite values in rows {bad[:10].tolist()}")
    norms = np.linalg.norm(x, axis=1)
    if (norms < _MIN_NORM).any():
        bad = np.where(norms < _MIN_NORM)[0]
        raise GalleryValidationError(f"{what} has zero-length rows {bad[:10].tolist()}")
    return (x / norms[:, None]).astype(np.float32)


def query_row(vector: np.ndarray, dim: int) -> np.ndarray:
    """One search vector, (dim,) or (1, dim) -> a (1, dim) float32 unit row."""
    x = np.asarray(vector)
    if x.ndim == 1:
        x = x[None, :]
    if x.shape[0] != 1:
        raise GalleryValidationError(f"search takes one vector, got shape {np.shape(vector)}")
    return unit_rows(x, dim, what="query vector")


def _opt_str(img: NewImage, name: str) -> str | None:
    v = getattr(img, name)
    if v is not None and not isinstance(v, str):
        raise GalleryValidationError(f"{name} must be a string or None, got {type(v).__name__}")
    return v


def prepare_row(img: NewImage, i: int) -> dict[str, Any]:
    """Check ``images[i]`` of an add and turn it into a row dict (its blob not yet written)."""
    if not isinstance(img, NewImage):
        raise GalleryValidationError(f"images[{i}] is a {type(img).__name__}, not a NewImage")
    pid = img.patient_id
    if pid is not None and (not isinstance(pid, str) or not pid.strip()):
        raise GalleryValidationError(f"images[{i}].patient_id must be a non-empty string or None")
    pid = checked_patient_id(pid, source=f"images[{i}].patient_id")
    if not isinstance(img.collection, str) or not img.collection.strip():
        raise GalleryValidationError(f"images[{i}].collection must be a non-empty string")
    row: dict[str, Any] = {"patient_id": pid, "collection": img.collection}
    for name in _STR_FIELDS:
        row[name] = _opt_str(img, name)
    tags = img.tags if img.tags is not None else {}
    if not isinstance(tags, dict) or not all(isinstance(k, str) for k in tags):
        raise GalleryValidationError(f"images[{i}].tags must be a dict with string keys")
    row["tags"] = {
        k: v if isinstance(v, str | int | float | bool) or v is None else str(v) for k, v in tags.items()
    }
    sha = img.sha256
    if sha is not None:
        if not isinstance(sha, str) or not _SHA256_RE.match(sha.lower()):
            raise GalleryValidationError(f"images[{i}].sha256 must be 64 hex digits")
        sha = sha.lower()
    blob = img.blob
    row["blob"] = None
    row["blob_sha256"] = None
    if blob is not None:
        if not isinstance(blob, bytes | bytearray | memoryview):
            raise GalleryValidationError(f"images[{i}].blob must be bytes")
        blob = bytes(blob)
        if not blob:
            raise GalleryValidationError(f"images[{i}].blob is empty")
        digest = hashlib.sha256(blob).hexdigest()
        row["blob"] = blob
        row["blob_sha256"] = digest
        # `sha256` names what the client sent; the stored blob may be a de-identified copy of it
        sha = sha or digest
    row["sha256"] = sha
    return row
