"""A read-only snapshot of a gallery data dir: every image's vector and metadata, for offline tools.

``GallerySnapshot.read(data_dir)`` opens the database with SQLite's ``mode=ro`` (no write, no
gallery process lock, no FAISS), reads the meta table and every image row in one read transaction
(a consistent WAL snapshot of committed data) and closes it again. It is safe while a server holds
the gallery open. The file name, the SQL and the blob layout are ``index.store``'s (``DB_NAME``,
``IMAGES_DIR``, ``read_images``, ``blob_path``, ``blobs_to_matrix``), so the storage format is
defined in one place; tools such as ``cxr-reid risk`` read a gallery through this instead of SQL.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .records import GalleryError
from .store import DB_NAME, IMAGES_DIR, blob_path, blobs_to_matrix, connect_read_only, read_images, read_meta


def is_gallery_dir(path: str | os.PathLike) -> bool:
    """``path`` is a directory holding a gallery database."""
    p = Path(path)
    return p.is_dir() and (p / DB_NAME).is_file()


@dataclass(frozen=True)
class GallerySnapshot:
    """Every image of a gallery at one moment, in image_id order (row i of each field is image i)."""

    data_dir: Path  # as given to ``read``
    db_path: Path  # the database file, resolved
    model_id: str | None  # the gallery's embedding model (meta table); None for a gallery never opened
    dim: int | None  # of its vectors (meta table)
    generation: int
    image_ids: np.ndarray  # (n,) int64, ascending
    patient_ids: list[str | None]
    collections: list[str]
    source_paths: list[str | None]
    blob_sha256: list[str | None]  # the stored original's sha256, None when only source_path is known
    row_model_ids: list[str]  # the model that made each row's vector
    vectors: np.ndarray  # (n, dim) float32 unit rows; (0, dim or 0) when empty

    @classmethod
    def read(cls, data_dir: str | os.PathLike) -> GallerySnapshot:
        """Read the gallery in ``data_dir``; ``GalleryError`` ("cannot read the gallery database
        ...") when its database is missing, locked past the timeout, damaged or not a gallery's."""
        data_dir = Path(data_dir)
        db = (data_dir / DB_NAME).resolve()
        try:
            conn = connect_read_only(db)
            try:
                conn.execute("BEGIN")  # one snapshot for the meta table and the rows
                meta = read_meta(conn)
                rows = read_images(conn)
                conn.execute("COMMIT")
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise GalleryError(f"cannot read the gallery database {db}: {exc}") from None
        dim = int(meta["dim"]) if meta.get("dim") else None
        return cls(
            data_dir=data_dir,
            db_path=db,
            model_id=meta.get("model_id"),
            dim=dim,
            generation=int(meta.get("generation") or 0),
            image_ids=np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)),
            patient_ids=[r[1] for r in rows],
            collections=[r[2] for r in rows],
            source_paths=[r[3] for r in rows],
            blob_sha256=[r[4] for r in rows],
            row_model_ids=[r[5] for r in rows],
            vectors=blobs_to_matrix([r[6] for r in rows], dim or 0),
        )

    def __len__(self) -> int:
        return int(self.image_ids.shape[0])

    @property
    def stored_paths(self) -> list[Path | None]:
        """Where each stored original lies under ``data_dir`` (None: the image has none)."""
        images_dir = self.data_dir / IMAGES_DIR
        return [blob_path(images_dir, sha) if sha else None for sha in self.blob_sha256]
