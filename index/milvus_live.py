"""The gallery's vectors in Milvus: ``LiveIndex`` with a ``MilvusIndex`` where the FAISS index was.

Chosen by ``Gallery(vector_url=...)`` (``CXR_REID_VECTOR_URL``). SQL (SQLite or PostgreSQL) stays
the truth, holding every vector; Milvus is a cache fed from it, like the FAISS index, but one that
lives outside the process, so:

- open: connect, open the collection of this gallery (its ``instance_id``) and model, and when Milvus
  and SQL disagree on the count, ``reconcile``: drop the ids SQL lacks, feed the ids Milvus lacks from
  SQL with their collections. A first open feeds everything, collection by collection;
- after a commit: the same change callbacks as FAISS (``add`` with each row's collection, which
  becomes its Milvus partition, and ``remove``). Writes are idempotent (upsert by image id), so when
  several replicas share one Milvus, each applying the change log is harmless, and whichever runs
  first makes it searchable. If Milvus fails after the SQL commit, the commit stands, the index is
  marked stale (``looks_consistent`` then fails, so ``/readyz`` says so) and the next write or
  ``save`` reconciles it from SQL;
- search: a collection is a partition, so a filtered search costs what that collection holds and no
  id list crosses the wire (``MilvusIndex.search(collection=)``);
- nothing to save, no layout to grow (Milvus builds its own indexes, ``choose_index``), no file cache;
- reindex (``reset``): the new model's vectors go into a new collection (the name carries the model
  id), fed from SQL; the old model's collection is then dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .faiss_index import VectorIndex
from .live_index import LiveIndex
from .milvus_index import MilvusIndex, MilvusIndexError
from .records import GalleryUnavailableError
from .store import Store

log = logging.getLogger(__name__)

#: Rows read from SQL and written to Milvus at a time while feeding it.
FEED_CHUNK = 4096


class MilvusLiveIndex(LiveIndex):
    """One open gallery's vectors in Milvus; see the module docstring."""

    def __init__(
        self,
        store: Store,
        path: Path,
        *,
        vector_url: str,
        dim: int,
        is_closed: Callable[[], bool],
        is_mismatched: Callable[[], bool],
    ) -> None:
        super().__init__(
            store,
            path,
            dim=dim,
            factory="milvus",
            nprobe=None,
            ef_search=1,
            auto_flat_max=0,
            autosave_seconds=None,
            is_closed=is_closed,
            is_mismatched=is_mismatched,
        )
        self.vector_url = vector_url
        self.current: MilvusIndex | None = None

    # ---------------------------------------------------------------- open, feed
    def _model_id(self) -> str:
        return self._store.meta_get("model_id") or "unset"

    def _open_collection(self) -> MilvusIndex:
        store = self._store
        gallery_id = store.meta_get("instance_id")
        try:
            return MilvusIndex.open(
                self.vector_url,
                gallery_id,
                self.dim,
                model_id=self._model_id(),
                expected_count=store.count(),
            )
        except MilvusIndexError as exc:
            raise GalleryUnavailableError(str(exc)) from exc

    def _load_or_build(self) -> MilvusIndex:
        idx = self._open_collection()
        if idx.stale:
            self._reconcile(idx)
        return idx

    def _reconcile(self, idx: MilvusIndex) -> None:
        """Make Milvus hold exactly SQL's ids: drop extras, feed what is missing (with collections)."""
        t0 = time.perf_counter()
        missing = idx.reconcile(self._store.ids())
        if missing.size == self._store.count() and missing.size:
            fed = self._feed_all(idx)
        else:
            fed = self._feed_ids(idx, missing)
        idx.flush()
        idx.stale = False
        log.info(
            "Milvus collection %s: fed %d vectors from SQL in %.1fs", idx.name, fed, time.perf_counter() - t0
        )

    def _feed_all(self, idx: MilvusIndex) -> int:
        fed = 0
        for collection in self._store.collection_counts():
            for ids, vectors in self._store.iter_vectors(collection, chunk=FEED_CHUNK):
                idx.add(vectors, ids, collection)
                fed += ids.size
        return fed

    def _feed_ids(self, idx: MilvusIndex, ids: np.ndarray) -> int:
        for s in range(0, ids.size, FEED_CHUNK):
            part = [int(i) for i in ids[s : s + FEED_CHUNK]]
            vectors = self._store.get_vectors(part)
            records = self._store.get_many(part)
            keep = [i for i in part if i in vectors and i in records]
            if keep:
                x = np.stack([vectors[i] for i in keep]).astype(np.float32)
                idx.add(x, np.asarray(keep, dtype=np.int64), [records[i].collection for i in keep])
        return int(ids.size)

    def build(self) -> MilvusIndex:
        """Re-feed Milvus from SQL (write lock held): after a failed update, or on demand."""
        idx = self.current if self.current is not None else self._open_collection()
        self._reconcile(idx)
        return idx

    def reset(self, dim: int) -> None:
        """After a reindex: the new model's collection, fed from SQL; the old one is dropped."""
        old = self.current
        self.dim = dim
        self.current = self._load_or_build()
        self.invalidate()
        if old is not None and old.name != self.current.name:
            old.drop()
            old.close()

    def count(self) -> int:
        try:
            return self.current.ntotal
        except MilvusIndexError as exc:
            raise GalleryUnavailableError(str(exc)) from exc

    def ids(self) -> np.ndarray:
        try:
            return self.current.ids()
        except MilvusIndexError as exc:
            raise GalleryUnavailableError(str(exc)) from exc

    @property
    def behind(self) -> bool:
        return self.current is not None and self.current.stale

    def close(self) -> None:
        if self.current is not None:
            self.current.close()

    # ---------------------------------------------------------------- writes
    def update(self, change: Callable[[VectorIndex], None], *, seq: int | None = None) -> None:
        """Apply a committed change to Milvus; on failure the commit stands and the index is marked
        stale, to be reconciled from SQL at the next write (Milvus may be down for a while)."""
        try:
            change(self.current)
        except Exception as exc:
            log.warning(
                "Milvus update failed after the commit (%s); it is re-fed from SQL at the next write", exc
            )
            self.current.stale = True

    def after_write(self) -> None:
        if self.current.stale:
            try:
                self._reconcile(self.current)
            except Exception as exc:
                log.warning("Milvus is still behind SQL (%s); trying again at the next write", exc)

    def save(self) -> None:
        """Reconcile if a write failed, then flush (a Milvus server seals segments by itself)."""
        self.after_write()
        self.current.flush()

    def dirty(self) -> bool:
        return False

    def maybe_rebuild_in_background(self) -> None:
        """Milvus indexes its segments itself: nothing to grow here."""

    # ---------------------------------------------------------------- search
    def search(self, query: np.ndarray, k: int, collection: str | None) -> tuple[np.ndarray, np.ndarray]:
        try:
            return self.current.search(query, k, collection=collection)
        except MilvusIndexError as exc:
            raise GalleryUnavailableError(str(exc)) from exc
