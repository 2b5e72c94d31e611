"""A replica follows the database's change log, so its in-memory index matches every writer's.

With PostgreSQL as the truth (index/pg_store.py) several processes write one gallery; each keeps
its own FAISS index in memory. Every write appends to the ``changes`` table in its transaction
(its sequence number is taken after the generation row's lock, so sequence order is commit order)
and NOTIFYs ``cxr_reid_changes``. ``ChangeFollower`` listens on its own connection and, on a
notification or every ``poll_seconds`` whichever comes first (a notification sent while this replica
was disconnected is caught up by the poll), applies the changes after the last one it applied:

- ``add``: the images' vectors are read from the database and added (an image deleted since is
  skipped; its ``delete`` follows in the log);
- ``delete``: removed from the index; ``relabel``: nothing to move, cached filters are dropped;
- ``calibration``: the listeners the gallery registered are told (the service reloads its
  operating point);
- ``reindex`` (every vector swapped to a new model): the follower stops there and a thread of its
  own tells the gallery, which rebuilds the index from the new vectors (the service first holds its
  requests and swaps in its next network, so no answer mixes two networks) and resumes it.

With the vectors in Milvus (``MilvusLiveIndex``), every replica applies the log to the one shared
Milvus: its writes are upserts and deletes by image id, so applying a change twice is harmless, and
an ``add`` carries each row's collection (its Milvus partition).

A replica's own writes go through the same path: ``catch_up`` right after the commit, under the
write lock, so what a client was told is stored is searchable on that replica when the answer
leaves, and on the others within the lag ``/readyz`` reports.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import psycopg

from .live_index import LiveIndex
from .pg_store import NOTIFY_CHANNEL, PgStore, redacted, utc_age_seconds

log = logging.getLogger(__name__)

#: Changes read per query while catching up.
BATCH = 1000


class ChangeFollower:
    """Applies the change log to one replica's ``LiveIndex``; see the module docstring."""

    def __init__(
        self,
        store: PgStore,
        live: LiveIndex,
        *,
        applied: int,
        generation: int,
        poll_seconds: float = 1.0,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        """``applied``: the last change already in ``live`` (read in the snapshot it was built from)."""
        self._store = store
        self._live = live
        self._lock = store.write_lock
        self.poll_seconds = float(poll_seconds)
        self._on_change = on_change
        self.applied = int(applied)
        self.generation = int(generation)
        self.applied_at = time.time()
        self._lags: list[float] = []  # seconds from commit to applied, this replica's recent changes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = False
        self.switching = False  # paused at a reindex change until the index is rebuilt (resume)

    # ---------------------------------------------------------------- applying
    def catch_up(self) -> int:
        """Apply every committed change not applied yet; returns how many. Thread-safe."""
        done = 0
        with self._lock:
            while not self.switching:
                batch = self._store.changes_after(self.applied, BATCH)
                if not batch:
                    break
                now = datetime.now(UTC)
                for seq, generation, kind, ids, collections, committed in batch:
                    if kind == "reindex":
                        self._start_switch()
                        break
                    self._apply(seq, kind, ids, collections)
                    self.applied, self.generation = seq, generation
                    self._lags.append(utc_age_seconds(committed, now))
                    done += 1
                del self._lags[:-1000]
                if len(batch) < BATCH:
                    break
            if done:
                self.applied_at = time.time()
        return done

    def _start_switch(self) -> None:
        """A reindex swapped every vector: stop here (what follows is the new model's) and let a
        thread of its own rebuild the index, through the gallery's reindex handler, which calls
        ``resume`` with the change its rebuilt index is at. Its own thread, because the handler may
        wait for requests in flight, and this may run in one of them (a write catching up)."""
        self.switching = True
        if self._on_change is None:
            return
        threading.Thread(target=self._switch, name="cxr-reid-model-switch", daemon=True).start()

    def _switch(self) -> None:
        try:
            self._on_change("reindex")
        except Exception:
            log.exception("switching to the reindexed vectors failed; restart this process")

    def resume(self, applied: int, generation: int) -> None:
        """The index was rebuilt from the snapshot at change ``applied``: follow on from there."""
        with self._lock:
            self.applied, self.generation = int(applied), int(generation)
            self.applied_at = time.time()
            self.switching = False

    def _apply(self, seq: int, kind: str, ids: list[int], collections: list[str]) -> None:
        live = self._live
        if kind == "add" and ids:
            found = self._store.get_vectors(ids)
            keep = [i for i in ids if i in found]
            if keep:
                x = np.stack([found[i] for i in keep]).astype(np.float32)
                id_arr = np.asarray(keep, dtype=np.int64)
                if len(collections) == 1:  # the usual case: one request, one collection
                    where: str | list[str] = collections[0]
                else:  # the collection of each row (a Milvus index keeps each in its own partition)
                    records = self._store.get_many(keep)
                    where = [records[i].collection if i in records else "default" for i in keep]
                live.update(lambda idx: idx.add(x, id_arr, where), seq=seq)
        elif kind == "delete" and ids:
            live.update(lambda idx: idx.remove(ids), seq=seq)
        live.invalidate(collections or None)
        if kind == "calibration" and self._on_change is not None:
            try:
                self._on_change(kind)
            except Exception:
                log.exception("a listener failed on change %d (%s)", seq, kind)

    # ---------------------------------------------------------------- state
    def lag_seconds(self) -> float:
        """How far behind the database this replica is: the age of the oldest change it has not
        applied (0 when it has applied everything committed)."""
        return utc_age_seconds(self._store.oldest_after(self.applied))

    def status(self) -> dict:
        """What ``/readyz`` reports for this replica."""
        latest = self._store.last_change()
        lags = sorted(self._lags)
        return {
            "database": redacted(self._store.url),
            "listening": self.connected,
            "applied_change": self.applied,
            "latest_change": latest,
            "behind": max(0, latest - self.applied),
            "lag_seconds": round(self.lag_seconds(), 3),
            "generation": self.generation,
            "switching_model": self.switching,
            "apply_lag_p50_ms": round(1000 * lags[len(lags) // 2], 1) if lags else None,
            "apply_lag_p99_ms": round(1000 * lags[min(len(lags) - 1, int(0.99 * len(lags)))], 1)
            if lags
            else None,
        }

    # ---------------------------------------------------------------- the listening thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cxr-reid-change-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._store.url, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self.connected, backoff = True, 0.5
                    log.info("following the change log of %s", redacted(self._store.url))
                    while not self._stop.is_set():
                        self.catch_up()
                        for _ in conn.notifies(timeout=self.poll_seconds, stop_after=1):
                            pass
            except Exception as exc:  # the database restarted or is unreachable: try again
                if self._stop.is_set():
                    break
                if self.connected:
                    log.warning(
                        "lost the change log of %s (%s); reconnecting", redacted(self._store.url), exc
                    )
                self.connected = False
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        self.connected = False
        with contextlib.suppress(Exception):
            log.info("stopped following the change log")
