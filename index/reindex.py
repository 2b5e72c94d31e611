"""Re-embedding a gallery with a new model, batched and resumable: the ``reindex_staging`` table.

New vectors go to the staging table one committed batch at a time (embedding runs outside the write
lock, so enrolment goes on), then a single transaction swaps every row's vector and model id and the
gallery's model id (``swap``). The target (model id and dim) is kept in the meta table: an
interrupted reindex resumes after its last committed batch when called again with the same target;
another target starts over. ``Gallery.reindex`` orders the steps and rebuilds FAISS after the swap.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from .records import GalleryValidationError, ImageRecord
from .store import Store
from .validation import unit_rows

log = logging.getLogger(__name__)

# callable(n_done, n_total) or a tqdm-like object with update(n) and total
ProgressLike = Any


def progress_reporter(progress: ProgressLike | None) -> Callable[[int, int], None]:
    """Accept ``callable(n_done, n_total)`` or a tqdm-like object (``update(n)``, ``total``)."""
    if progress is None:
        return lambda done, total: None
    if hasattr(progress, "update") and hasattr(progress, "total"):
        last = [0]

        def _tqdm(done: int, total: int) -> None:
            if progress.total != total:
                with contextlib.suppress(Exception):
                    progress.total = total
                    if hasattr(progress, "refresh"):
                        progress.refresh()
            if done > last[0]:
                progress.update(done - last[0])
                last[0] = done

        return _tqdm
    if callable(progress):
        return progress
    raise GalleryValidationError("progress must be a callable(n_done, n_total) or a tqdm-like object")


class _PendingImagesError(Exception):
    """An image without a staged vector was found at the swap (rolled back; embed it, try again)."""


class ReindexStaging:
    """The staged new vectors of one reindex target (``model_id`` with ``dim``-d vectors)."""

    def __init__(self, store: Store, model_id: str, dim: int) -> None:
        self._store = store
        self.model_id = model_id
        self.dim = dim
        self._target = f"{model_id}\x1f{dim}"

    def begin(self) -> None:
        """Resume the staging of this target, or drop another target's and start over."""
        store = self._store
        with store.write_txn() as conn:
            if store.meta_get("reindex_target", conn) != self._target:
                conn.execute("DELETE FROM reindex_staging")
                store.meta_set(conn, "reindex_target", self._target)
            else:
                log.info("resuming the reindex to %s", self.model_id)

    def pending(self, limit: int) -> list[int]:
        """Up to ``limit`` ids of images with no staged vector yet, ascending."""
        rows = (
            self._store.reader()
            .execute(
                "SELECT i.image_id FROM images i LEFT JOIN reindex_staging s ON s.image_id = i.image_id "
                "WHERE s.image_id IS NULL ORDER BY i.image_id LIMIT ?",
                (limit,),
            )
            .fetchall()
        )
        return [int(r[0]) for r in rows]

    def staged(self) -> int:
        """How many images (still in the gallery) have a staged vector."""
        return int(
            self._store.reader()
            .execute("SELECT COUNT(*) FROM reindex_staging s JOIN images i ON i.image_id = s.image_id")
            .fetchone()[0]
        )

    def embed_batch(self, ids: list[int], embed: Callable[[list[ImageRecord]], np.ndarray]) -> int:
        """Embed the images ``ids`` (those deleted meanwhile are skipped) and commit their vectors to
        the staging table; returns how many were staged."""
        store = self._store
        by_id = store.get_many(ids)
        records = [by_id[i] for i in ids if i in by_id]
        if not records:
            return 0
        x = unit_rows(embed(records), self.dim, what="embed() output")
        if x.shape[0] != len(records):
            raise GalleryValidationError(f"embed() returned {x.shape[0]} vectors for {len(records)} images")
        with store.write_txn() as conn:
            conn.executemany(
                "INSERT INTO reindex_staging (image_id, vector) "
                "SELECT image_id, ? FROM images WHERE image_id = ? "
                "ON CONFLICT (image_id) DO UPDATE SET vector = excluded.vector",
                [(xi.astype("<f4").tobytes(), r.image_id) for xi, r in zip(x, records, strict=True)],
            )
        return len(records)

    def swap(self) -> bool:
        """One transaction: every row takes its staged vector and the new model id, and so does the
        gallery (call with the write lock held, once nothing is pending). False, and nothing changed,
        when an image without a staged vector turned up: with PostgreSQL another process may have
        enrolled one after the last ``pending``; embed it and swap again.

        The generation row is locked first, so the swap is ordered with every insert (each bumps it
        in its transaction): an image committed before the swap is counted here, one after it sees
        the new model id and is refused unless it is the new model's (``Gallery.add_with_alerts``)."""
        store = self._store
        try:
            with store.write_txn() as conn:
                store.bump_generation(conn)
                missing = conn.execute(
                    "SELECT COUNT(*) FROM images i LEFT JOIN reindex_staging s ON s.image_id = i.image_id "
                    "WHERE s.image_id IS NULL"
                ).fetchone()[0]
                if missing:
                    raise _PendingImagesError  # rolls the transaction back
                self._swap_rows(conn)
        except _PendingImagesError:
            return False
        return True

    def _swap_rows(self, conn: Any) -> None:
        store = self._store
        conn.execute(
            "UPDATE images SET model_id = ?, vector = "
            "(SELECT s.vector FROM reindex_staging s WHERE s.image_id = images.image_id)",
            (self.model_id,),
        )
        conn.execute("DELETE FROM reindex_staging")
        store.meta_set(conn, "reindex_target", None)
        store.meta_set(conn, "model_id", self.model_id)
        store.meta_set(conn, "dim", str(self.dim))
        store.log_change(conn, "reindex")
