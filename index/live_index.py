"""The gallery's FAISS index over its life: a cache of the vectors in SQLite, kept in step with it.

``LiveIndex`` owns the in-memory ``VectorIndex`` of one open gallery and everything that keeps it
true to the store, so that ``Gallery`` only says when:

- open: load ``faiss.index`` when its tag (generation, instance id, model id, dim, row count, max
  id, id sum) matches SQLite, else build it from SQLite and save it; a crash never loses anything,
  it only costs a rebuild;
- after a commit: apply the change in place (``update``); if that fails, rebuild from SQLite;
- after a write (``after_write``): compact tombstones once they pass 10% of the index (HNSW cannot
  remove ids), autosave every ``autosave_seconds``, and with "auto" grow into a bigger layout;
- ``save``: compact / train a fallback index first, then write it atomically with its tag;
- per-collection id lists for filtered searches (``allowed``), cached until the next write.

Layout: ``factory="auto"`` serves exact Flat while the gallery is small and IVF-Flat above
``auto_flat_max`` images (figures in ``index/faiss_index.py``). Growing into a bigger layout
rebuilds the index in a background thread (``_rebuild``: SQLite snapshot, build without locks,
replay of the writes made meanwhile, atomic swap, save); searches use the current index until the
swap. It never rebuilds downwards: after deletes the layout stays until the gallery is next opened.

Locking: every mutation runs under the store's write lock (``Store.write_lock``, which the gallery's
writers hold across their SQLite commit and the FAISS change); searches read ``current`` without it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from .faiss_index import (
    AUTO,
    AllowedIds,
    VectorIndex,
    _make_base,
    auto_layout,
    layout_rank,
    min_training_points,
)
from .store import Store

log = logging.getLogger(__name__)

INDEX_FILE = "faiss.index"


class _RebuildCancelledError(Exception):
    """A background rebuild stopped because the gallery is closing."""


class LiveIndex:
    """The FAISS index of one open gallery; see the module docstring."""

    def __init__(
        self,
        store: Store,
        path: Path,
        *,
        dim: int,
        factory: str,
        nprobe: int | None,
        ef_search: int,
        auto_flat_max: int,
        autosave_seconds: float | None,
        is_closed: Callable[[], bool],
        is_mismatched: Callable[[], bool],
    ) -> None:
        """``dim``: of the stored vectors (``reset`` changes it after a reindex). ``is_closed`` /
        ``is_mismatched``: the gallery's state; no background rebuild runs on a closed gallery or on
        vectors of another model."""
        self._store = store
        self._lock = store.write_lock
        self.path = path
        self.dim = dim
        self.factory = factory
        self.nprobe = nprobe
        self.ef_search = ef_search
        self.auto_flat_max = auto_flat_max
        self.autosave_seconds = autosave_seconds
        self._is_closed = is_closed
        self._is_mismatched = is_mismatched
        self.current: VectorIndex | None = None
        self._saved_generation: int | None = None
        self._last_save = time.monotonic()
        self._cache_lock = threading.Lock()
        self._cache_version = 0
        self._allowed_cache: dict[str, AllowedIds] = {}
        # background rebuild ("auto"): the thread, and the FAISS changes made while it builds
        self._rebuild_thread: threading.Thread | None = None
        self._rebuild_changes: list[tuple[int | None, Callable[[VectorIndex], None]]] | None = None
        self._rebuild_cancel = threading.Event()

    # ---------------------------------------------------------------- load, build, save
    def open(self) -> None:
        """Load or build the index, then grow it in the background if its size asks (write lock held)."""
        self.current = self._load_or_build()
        self.maybe_rebuild_in_background()

    def _tag(self) -> dict:
        """What a saved FAISS file must match to be reused (call with the write lock held)."""
        store = self._store
        return {
            "generation": int(store.meta_get("generation") or 0),
            "instance_id": store.meta_get("instance_id"),
            "model_id": store.meta_get("model_id"),
            "dim": self.dim,
            **store.id_stats(),
        }

    def _training_need(self) -> int:
        if self.factory in ("Flat", AUTO):  # auto never builds what it cannot train
            return 0
        return min_training_points(_make_base(self.dim, self.factory), self.factory)

    def _load_or_build(self) -> VectorIndex:
        tag = self._tag()
        idx = VectorIndex.load(
            self.path, tag, factory=self.factory, nprobe=self.nprobe, ef_search=self.ef_search
        )
        if idx is not None and idx.is_fallback and tag["count"] >= self._training_need():
            log.info("gallery now has enough vectors to train %s: rebuilding", self.factory)
            idx = None
        if idx is not None:
            if idx.is_fallback and tag["count"]:
                log.warning(
                    "index_factory %r cannot train on %d vectors yet: using an exact Flat index",
                    self.factory,
                    tag["count"],
                )
            self._saved_generation = tag["generation"]
            return idx
        idx = self.build()
        self._save_index(idx)
        return idx

    def _layout(self, count: int) -> str:
        """What to build for ``count`` vectors: the factory asked for, or the pick of "auto" by size."""
        return auto_layout(count, self.auto_flat_max) if self.factory == AUTO else self.factory

    def _new_index(
        self,
        count: int,
        train_sample: Callable[[int], np.ndarray],
        chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    ) -> VectorIndex:
        """A FAISS index of this gallery's settings and layout for ``count`` vectors, filled from
        ``chunks`` (the open-time build and the background rebuild differ only in where those come from)."""
        return VectorIndex.build(
            self.dim,
            self.factory,
            nprobe=self.nprobe,
            ef_search=self.ef_search,
            count=count,
            train_sample=train_sample,
            chunks=chunks,
            layout=self._layout(count),
        )

    def build(self) -> VectorIndex:
        """A fresh FAISS index from the vectors in SQLite (call with the write lock held)."""
        store = self._store
        count = store.count()
        t0 = time.perf_counter()
        idx = self._new_index(count, store.sample_vectors, store.iter_vectors)
        log.info(
            "built FAISS index %s over %d vectors in %.2fs",
            idx.effective_factory,
            count,
            time.perf_counter() - t0,
        )
        return idx

    def count(self) -> int:
        """Vectors in the index."""
        return self.current.ntotal

    def ids(self) -> np.ndarray:
        """The ids in the index, sorted."""
        return self.current.ids()

    @property
    def behind(self) -> bool:
        """A committed change is known not to be in the index yet (Milvus was unreachable): never for
        the in-process FAISS index, which rebuilds from the store instead."""
        return False

    def close(self) -> None:
        """Nothing to release: the index is process memory (MilvusLiveIndex closes its client)."""

    def reset(self, dim: int) -> None:
        """After a reindex swapped every vector: rebuild for ``dim``-d vectors, save (write lock held)."""
        self.dim = dim
        self.current = self.build()
        self.invalidate()
        self._save_index(self.current)

    def _save_index(self, idx: VectorIndex) -> None:
        tag = self._tag()
        idx.save(self.path, tag)
        self._saved_generation = tag["generation"]
        self._last_save = time.monotonic()

    def save(self) -> None:
        """Persist the index now, compacting tombstones / training a fallback index first (write lock
        held)."""
        idx = self.current
        if idx.tombstone_count or (idx.is_fallback and self._store.count() >= self._training_need()):
            idx = self.current = self.build()
        self._save_index(idx)

    def dirty(self) -> bool:
        """SQLite moved on since the index was last saved."""
        return int(self._store.meta_get("generation") or 0) != self._saved_generation

    # ---------------------------------------------------------------- after a commit
    def update(self, change: Callable[[VectorIndex], None], *, seq: int | None = None) -> None:
        """Apply a committed change to FAISS; if that fails, rebuild it from SQLite (the truth).
        During a background rebuild the change is also kept, to be replayed on the new index.
        ``seq``: its place in a PostgreSQL change log (index/follow.py), None for SQLite."""
        try:
            change(self.current)
        except Exception:
            log.exception("FAISS update failed after the SQLite commit; rebuilding the index from SQLite")
            self.current = self.build()
        if self._rebuild_changes is not None:
            self._rebuild_changes.append((seq, change))

    def after_write(self) -> None:
        """Compact tombstones when they pile up; autosave now and then (write lock held)."""
        if self.current.needs_compaction:
            log.info("compacting FAISS index (%d tombstones)", self.current.tombstone_count)
            self.current = self.build()
        if (
            self.autosave_seconds is not None
            and self.dirty()
            and time.monotonic() - self._last_save >= self.autosave_seconds
        ):
            try:
                self.save()
            except Exception:
                log.exception("autosave of the FAISS index failed (SQLite still has everything)")
        self.maybe_rebuild_in_background()

    # ---------------------------------------------------------------- collection filters
    def allowed(self, collection: str) -> AllowedIds:
        """The ids of ``collection`` as a FAISS filter, cached until a write touches it."""
        with self._cache_lock:
            hit = self._allowed_cache.get(collection)
            version = self._cache_version
        if hit is not None:
            return hit
        allowed = AllowedIds(self._store.ids(collection))
        with self._cache_lock:
            if self._cache_version == version:  # no write slipped in while we read SQLite
                self._allowed_cache[collection] = allowed
        return allowed

    def search(self, query: np.ndarray, k: int, collection: str | None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) of ``query`` (1, dim) in ``collection`` (None: every collection)."""
        idx = self.current
        allowed = None
        if collection is not None:
            allowed = self.allowed(collection)
            if len(allowed) == 0:
                return np.empty(0, dtype=np.float32), np.empty(0, dtype=np.int64)
            if len(allowed) >= idx.ntotal:  # the collection is everything: no selector needed
                allowed = None
        return idx.search(query, k, allowed)

    def invalidate(self, collections: Iterable[str] | None = None) -> None:
        """Forget the cached ids of ``collections`` (None: all)."""
        with self._cache_lock:
            self._cache_version += 1
            if collections is None:
                self._allowed_cache.clear()
            else:
                for c in collections:
                    self._allowed_cache.pop(c, None)

    # ---------------------------------------------------------------- background rebuild ("auto")
    @property
    def rebuilding(self) -> bool:
        """A background rebuild into a bigger layout is running (searches use the current index)."""
        thread = self._rebuild_thread
        return thread is not None and thread.is_alive()

    def wait_for_rebuild(self, timeout: float | None = None) -> bool:
        """Wait for a running background rebuild; True when none is running any more."""
        thread = self._rebuild_thread
        if thread is not None:
            thread.join(timeout)
        return not self.rebuilding

    def stop_rebuild(self) -> None:
        """Cancel a background rebuild (it stops between chunks; a k-means already training
        finishes) and wait for it, unless called from it."""
        self._rebuild_cancel.set()
        thread = self._rebuild_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def maybe_rebuild_in_background(self) -> None:
        """With "auto": start a rebuild into the layout the gallery's size now calls for, when that is
        bigger than the one in use (write lock held). Never downwards: after deletes the gallery keeps
        its layout until it is next opened, so a size near a boundary does not rebuild back and forth."""
        if self.factory != AUTO or self._is_closed() or self._is_mismatched() or self.rebuilding:
            return
        current = self.current
        if layout_rank(self._layout(current.ntotal)) <= layout_rank(current.effective_factory):
            return
        self._rebuild_cancel.clear()
        self._rebuild_thread = threading.Thread(
            target=self._rebuild, args=(current,), name="cxr-reid-index-rebuild", daemon=True
        )
        self._rebuild_thread.start()

    def _rebuild(self, current: VectorIndex) -> None:
        """The background rebuild (its own thread). Build-from-snapshot-then-replay, not "rebuild
        until the generation stands still", which a steady stream of enrolments could starve:

        1. under the write lock, open a SQLite read transaction (a WAL snapshot, pinned by its first
           SELECT) and start recording every FAISS change (``update`` appends it); writers commit
           under that same lock, so each write is either in the snapshot or recorded;
        2. without any gallery lock, train and fill the new index from the snapshot, while searches
           and writes go on against ``current``;
        3. under the write lock again, replay the recorded changes on the new index (adds and removes
           in commit order), swap it in and save it with the tag of the generation it now matches.

        If the index was replaced meanwhile (a reindex, a compaction, a failed update's rebuild) the
        new one is dropped: it was built from vectors that no longer hold.
        """
        store = self._store
        t0 = time.perf_counter()
        try:
            with contextlib.ExitStack() as stack:
                with self._lock:
                    if self._is_closed() or self.current is not current:
                        return
                    conn = stack.enter_context(store.read_txn())
                    count = int(conn.execute("SELECT COUNT(*) FROM images").fetchone()[0])
                    # with PostgreSQL, other processes commit outside this lock: the snapshot may
                    # hold changes this replica applies only later; those are not replayed
                    in_snapshot = store.last_change(conn)
                    self._rebuild_changes = []
                log.info(
                    "rebuilding the FAISS index as %s over %d vectors in the background",
                    self._layout(count),
                    count,
                )
                idx = self._new_index(
                    count,
                    lambda n: store.sample_vectors(n, conn=conn),
                    lambda: self._until_cancelled(store.iter_vectors(conn=conn)),
                )
            with self._lock:
                changes, self._rebuild_changes = self._rebuild_changes or [], None
                if self._is_closed() or self._rebuild_cancel.is_set() or self.current is not current:
                    log.info("background rebuild dropped: the gallery closed or its index was replaced")
                    return
                for seq, change in changes:
                    if seq is None or seq > in_snapshot:
                        change(idx)
                self.current = idx
                self._save_index(idx)
            log.info(
                "FAISS index is now %s (%d vectors, %d changes replayed), rebuilt in %.1fs",
                idx.effective_factory,
                idx.ntotal,
                len(changes),
                time.perf_counter() - t0,
            )
        except _RebuildCancelledError:
            log.info("background rebuild of the FAISS index cancelled: the gallery is closing")
        except Exception:
            log.exception("background rebuild of the FAISS index failed; the current index stays in use")
        finally:
            with self._lock:
                self._rebuild_changes = None

    def _until_cancelled(
        self, chunks: Iterable[tuple[np.ndarray, np.ndarray]]
    ) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        for chunk in chunks:
            if self._rebuild_cancel.is_set():
                raise _RebuildCancelledError
            yield chunk
