"""The FAISS side of the gallery: an inner-product index keyed by SQLite image ids.

It is a cache of the vectors in SQLite, never the truth: the gallery rebuilds it from SQLite whenever
the saved file is missing, unreadable or tagged with another generation.

Index layouts (``factory`` is a ``faiss.index_factory`` string, metric always inner product):
- "auto" (the gallery's default): the gallery picks the layout by size (``auto_layout``: Flat, then
  IVF-Flat above AUTO_FLAT_MAX, then IVF fast-scan PQ with exact re-ranking from AUTO_REFINE_MIN;
  the comment at AUTO_FLAT_MAX gives the measured reasons) and rebuilds in the background when its
  size calls for a bigger one; the saved tag keeps factory "auto" and the built layout as
  ``effective_factory``.
- "Flat": ``IndexIDMap(IndexFlatIP)``, exact.
- IVF ("IVF256,Flat", "IVF1024,PQ32", ...): the IVF index holds the ids itself (``add_with_ids``);
  it is *not* wrapped in IndexIDMap because IndexIDMap.remove_ids renumbers its map while IVF keeps
  its stored labels, which corrupts the mapping. IVF needs training: with too few vectors the index
  falls back to Flat (logged) and is trained at the next rebuild that has enough (``Gallery.save()``
  or the next open).
- IVF with exact re-ranking ("IVF4096,PQ256x4fs,RFlat": an IVF factory plus ",RFlat"): the IVF index
  (native ids, as above) proposes ``k * k_factor`` candidates, which are re-scored exactly against
  the float vectors kept in an ``IndexIDMap2(IndexFlatIP)`` (its reverse map finds a vector by id);
  results carry exact inner products. FAISS's own IndexRefine cannot be used for the search (it
  takes the IVF's labels for row numbers and rejects any id >= ntotal), and an IndexIDMap around it
  would drop ID selectors silently; so the VectorIndex drives both parts itself (add, remove_ids and
  the selector go to both / the IVF), and an ``IndexRefine`` only holds them together for
  ``write_index`` / ``read_index``. Deletes are real (both parts remove the ids), no tombstones.
- HNSW ("HNSW32", ...) and anything else: wrapped in ``IndexIDMap``. HNSW cannot remove vectors, so a
  delete only *tombstones* the id: searches filter tombstoned ids out (IDSelectorNot) and the gallery
  compacts (rebuilds from SQLite) once tombstones pass 10% of the index and always before saving.

Collection filters go into FAISS as ``IDSelectorBatch`` search parameters; for index types that
reject selectors (or, like an IndexIDMap around FAISS's IndexRefine, would ignore them) the search
falls back to over-fetching and filtering.

Thread safety: a reader-writer lock; searches run concurrently (FAISS search is const), add/remove
take it exclusively. SearchParameters objects are built per call and never shared: IndexIDMap swaps
the selector inside them during a search, so sharing one between threads would race.

Why one module of this size: every layout's quirks (IVF's own ids, HNSW tombstones, re-ranking,
selectors) meet in the same add, remove and search methods; this docstring is their one explanation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from ._fs import atomic_write, fsync_dir, remove_stale_temps
from .records import GalleryValidationError

log = logging.getLogger(__name__)


def faiss_build() -> str:
    """The FAISS version and the instruction set its loaded library was compiled for (e.g. AVX2)."""
    return f"faiss {faiss.__version__} ({faiss.get_compile_options().strip() or 'generic'})"


TAG_FORMAT = 1
TOMBSTONE_COMPACT_FRACTION = 0.10
AUTO = "auto"
# index_factory="auto": exact Flat below AUTO_FLAT_MAX vectors, IVF-Flat (auto_layout: ~4 sqrt(n)
# lists) searched with auto_nprobe lists from there on, and from AUTO_REFINE_MIN the same lists as
# re-ranked fast-scan PQ (below). Figures from `python bench/search.py --n 100000 --threads 1` and
# `--n 1000000` (512-d vectors drawn as patient clusters with the then shipped 128 px model's genuine
# / impostor cosines, 1000 held-out queries, one query per call, k=10, a shared 2-core machine):
# - Flat's single-query p50 is 18-26 ms at 1e5 and 193 ms at 1e6, linear in n (0.18-0.26 us a
#   vector): it passes 2 ms at 8k-11k vectors, hence 10_000;
# - recall@10 >= 0.95 at 1e5: HNSW32 efSearch 128 (0.952, p50 1.7 ms, build 66 s), IVF-Flat nprobe 64
#   of 1024 lists (0.986, p50 3.0 ms, build 25 s), IVF-SQ8 nprobe 64 (0.974, p50 1.7 ms, 541 B a
#   vector); IVF-PQ32 stays at 0.33 whatever nprobe;
# - at 1e6: IVF-Flat nprobe 64 of 4096 lists 0.929, nprobe 128 0.979 (p50 16 ms, build 170 s);
#   HNSW32 (efConstruction 40) gets only 0.836 at efSearch 256 (p50 4.1 ms) after a 749 s build.
# IVF-Flat is the pick below AUTO_REFINE_MIN: it keeps recall where HNSW32 loses it; its scores are
# exact cosines (SQ8 rounds them, and the FAR thresholds are applied to these scores); it removes ids
# (HNSW only tombstones, and its compaction is a full rebuild under the write lock); it builds in
# minutes. Its memory is Flat's plus 8 bytes of id a vector.
# nprobe (auto_nprobe): 64 holds 0.95 at 1e5, 128 at 1e6: lists / 32 once that is more than 64.
# From AUTO_REFINE_MIN on, the same lists hold 4-bit fast-scan PQ codes (PQ<dim/2>x4fs: 2 dimensions a
# sub-quantizer, 128 bytes a vector at 512-d) and the k * AUTO_K_FACTOR best codes are re-scored
# exactly from the float vectors (",RFlat", module docstring): scores stay exact, deletes real.
# `python bench/search.py --n 1000000 --indexes IVF-Flat,IVF-PQfs-RFlat --search-threads 1` (vectors
# fitted to the 224 px model, 2026-12-05; builds on 2 threads, searches on 1), through VectorIndex:
# - IVF4096,PQ256x4fs,RFlat nprobe 128: k_factor 20 0.979 (p50 1.17 ms), 30 0.986 (1.32 ms), 50
#   0.989 (1.67 ms); nprobe 64 k_factor 30 0.958 (0.93 ms); 2209 B a vector, build 462 s (341 of
#   them the coarse k-means IVF-Flat shares); IVF4096,Flat in the same run: nprobe 64 0.962 at
#   3.9 ms, 128 0.991 at 7.3 ms. PQ128x4fs (4 dimensions a sub-quantizer, 64 bytes; an ad-hoc run
#   with FAISS's IndexRefineFlat) needs k_factor 100 for 0.950 (1.2 ms), 200 for 0.979 (1.7 ms).
# - at 1e5 (same command, --n 100000): IVF1024,PQ256x4fs,RFlat nprobe 64 k_factor 30 0.993 at
#   0.44 ms against IVF1024,Flat nprobe 64 0.993 at 1.28 ms, built in the same 23 s; hence
#   AUTO_REFINE_MIN = 100_000 (IVF-Flat is the simpler layout while it is well under 2 ms), and
#   AUTO_K_FACTOR = 30 (20 leaves 0.979 at 1e6, 50 adds 0.35 ms for 0.003).
AUTO_FLAT_MAX = 10_000
AUTO_NPROBE = 64
AUTO_REFINE_MIN = 100_000
AUTO_PQ_DIMS = 2  # dimensions per 4-bit sub-quantizer of the re-ranked layout (PQ256x4fs at 512-d)
AUTO_K_FACTOR = 30  # candidates re-scored exactly: k * AUTO_K_FACTOR
DEFAULT_DIM = 512  # the shipped model's: auto_layout's PQ size when it is not told the dimension
REFINE_SUFFIX = ",RFlat"
_MIN_POINTS_PER_CENTROID = 39  # faiss k-means warns below this
_MAX_POINTS_PER_CENTROID = 256  # and subsamples above it


class PairLimitError(ValueError):
    """More pairs reach the thresholds than the caller let :func:`pairs_above` hold in memory."""


def pairs_above(
    vectors: np.ndarray, limits: np.ndarray, *, chunk: int = 2048, max_pairs: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of rows (a < b) whose inner product reaches the limit of either row: exact, by
    FAISS range search over a flat index, ``chunk`` query rows at a time (O(n^2 d) work, memory
    bounded by the pairs found). Returns (a, b, score) arrays. More than ``max_pairs`` candidate
    pairs raise :class:`PairLimitError` (raise the limits).
    """
    X = np.ascontiguousarray(vectors, dtype=np.float32)
    n = X.shape[0]
    limits = np.asarray(limits, dtype=np.float32).reshape(n)
    empty = np.zeros(0, dtype=np.int64)
    if n < 2:
        return empty, empty, np.zeros(0, dtype=np.float32)
    flat = faiss.IndexFlatIP(X.shape[1])
    flat.add(X)
    keys, scores = [], []
    found = 0
    for s in range(0, n, chunk):
        radius = float(np.nextafter(limits[s : s + chunk].min(), np.float32(-np.inf)))
        lims, dist, lab = flat.range_search(X[s : s + chunk], radius)
        q = np.repeat(np.arange(s, s + len(lims) - 1), np.diff(lims).astype(np.int64))
        m = (lab != q) & (dist >= limits[q])  # range_search keeps score > radius
        keys.append(np.minimum(q, lab)[m].astype(np.int64) * n + np.maximum(q, lab)[m])
        scores.append(dist[m])
        found += int(m.sum())
        if max_pairs is not None and found > 2 * max_pairs:  # each pair is found from both sides
            raise PairLimitError(f"more than {max_pairs:,} pairs reach the threshold")
    key, sc = np.concatenate(keys), np.concatenate(scores)
    key, first = np.unique(key, return_index=True)  # a pair found from both of its images once
    return key // n, key % n, sc[first]


def _numpy_search(
    index: faiss.Index, q: np.ndarray, k: int, params: object | None
) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` for numpy queries, with search parameters.

    ``faiss.contrib.torch_utils`` (imported by pytorch-metric-learning's inference utilities)
    replaces ``Index.search`` process-wide with a version that takes no ``params``; it keeps the
    original as ``search_numpy``, which is what we call when it is there.
    """
    search = getattr(index, "search_numpy", index.search)
    return search(q, k) if params is None else search(q, k, params=params)


class RWLock:
    """Many readers or one writer; waiting writers block new readers so writes are not starved.

    Not reentrant: never take it twice in one thread.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class AllowedIds:
    """The ids a search may return (one collection), with its FAISS selector built once and cached."""

    ids: np.ndarray  # int64, sorted
    _selector: object | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def selector(self) -> faiss.IDSelector:
        with self._lock:
            if self._selector is None:
                # IDSelectorBatch copies the ids into its own hash set; is_member is const, so one
                # selector can serve concurrent searches.
                self._selector = faiss.IDSelectorBatch(self.ids)
            return self._selector

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def normalise_factory(factory: str) -> str:
    """Canonical factory string: strip whitespace and a leading IDMap (the gallery adds its own)."""
    f = "".join(str(factory).split())
    for prefix in ("IDMap2,", "IDMap,"):
        if f.startswith(prefix):
            f = f[len(prefix) :]
    if not f:
        raise GalleryValidationError("index_factory is empty")
    return f


def min_training_points(base: faiss.Index, factory: str) -> int:
    """How many vectors training needs before we trust it (heuristic: 39 points per centroid)."""
    if base.is_trained:
        return 0
    ivf = faiss.try_extract_index_ivf(base)
    need = _MIN_POINTS_PER_CENTROID * int(ivf.nlist) if ivf is not None else 1000
    if "PQ" in factory.upper():
        need = max(need, _MIN_POINTS_PER_CENTROID * 256)
    return need


def _make_base(dim: int, factory: str) -> faiss.Index:
    try:
        return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise GalleryValidationError(f"invalid index_factory {factory!r}: {exc}") from exc


def validate_factory(dim: int, factory: str) -> str:
    """Check early (at Gallery open) that FAISS understands ``factory``; returns the canonical form."""
    f = normalise_factory(factory)
    if f.lower() == AUTO:
        return AUTO
    if f != "Flat":
        _make_base(dim, f)
    return f


def auto_layout(
    count: int, flat_max: int = AUTO_FLAT_MAX, *, refine_min: int | None = None, dim: int | None = None
) -> str:
    """The layout ``index_factory="auto"`` builds for ``count`` vectors: exact Flat below ``flat_max``,
    above it IVF-Flat with about 4 * sqrt(count) lists (a power of two, at least 39 vectors per list
    so k-means has enough to train on), and from ``refine_min`` (AUTO_REFINE_MIN, read at each call;
    only when it is above ``flat_max``) the same lists with 4-bit fast-scan PQ codes re-ranked
    exactly ("IVF4096,PQ256x4fs,RFlat" at 1e6, 512-d; ``dim`` sets the PQ size, DEFAULT_DIM when not
    given, and VectorIndex.build fits it to the gallery's dimension). See AUTO_FLAT_MAX for the
    figures behind the choice."""
    if count < max(int(flat_max), 1):
        return "Flat"
    want = 2 ** round(math.log2(4.0 * math.sqrt(count)))
    most = 2 ** int(math.log2(max(count // _MIN_POINTS_PER_CENTROID, 1)))
    nlist = max(1, min(want, most))
    refine_min = AUTO_REFINE_MIN if refine_min is None else int(refine_min)
    if count >= max(refine_min, int(flat_max)):
        return f"IVF{nlist},PQ{_pq_m(dim or DEFAULT_DIM)}x4fs{REFINE_SUFFIX}"
    return f"IVF{nlist},Flat"


def _pq_m(dim: int) -> int:
    """Sub-quantizers for ``dim``: dim / AUTO_PQ_DIMS, or the largest divisor of dim below that."""
    most = max(1, int(dim) // AUTO_PQ_DIMS)
    return next(m for m in range(most, 0, -1) if int(dim) % m == 0)


def fit_auto_layout(dim: int, layout: str) -> str:
    """An "auto" layout made buildable at ``dim``: the re-ranked layout's PQ size follows the dimension."""
    match = re.fullmatch(r"(IVF\d+),PQ\d+x4fs" + re.escape(REFINE_SUFFIX), layout)
    return f"{match.group(1)},PQ{_pq_m(dim)}x4fs{REFINE_SUFFIX}" if match else layout


def _nlist(layout: str) -> int:
    match = re.match(r"IVF(\d+)[,_]", layout)
    return int(match.group(1)) if match else 0


def auto_nprobe(layout: str) -> int:
    """IVF lists searched in an "auto" layout: AUTO_NPROBE, or nlist / 32 when more (see AUTO_FLAT_MAX)."""
    return max(AUTO_NPROBE, _nlist(layout) // 32)


def layout_rank(layout: str) -> int:
    """Orders the layouts ``auto`` builds: Flat 0, IVF by its list count, and at the same count the
    re-ranked fast-scan layout above IVF-Flat. The gallery only rebuilds upwards, so a gallery
    hovering around a boundary does not rebuild back and forth."""
    return 2 * _nlist(layout) + (1 if layout.endswith(REFINE_SUFFIX) else 0)


def refine_base_factory(factory: str) -> str | None:
    """The IVF factory under an exactly re-ranked one ("IVF4096,PQ256x4fs,RFlat" -> "IVF4096,PQ256x4fs"),
    None for any other factory. Only IVF bases are re-ranked by the VectorIndex itself (they keep ids)."""
    if not factory.endswith(REFINE_SUFFIX):
        return None
    base = factory[: -len(REFINE_SUFFIX)]
    return base if re.match(r"IVF\d+[,_]", base) else None


def _make_refined(dim: int, factory: str) -> faiss.Index:
    """IndexRefine(IVF base holding the ids, IndexIDMap2(IndexFlatIP)): a container for both parts."""
    base = _make_base(dim, refine_base_factory(factory))
    exact = faiss.IndexFlatIP(int(dim))
    by_id = faiss.IndexIDMap2(exact)
    by_id.own_fields = True
    exact.this.disown()
    index = faiss.IndexRefine(base, by_id)
    index.own_fields = True
    base.this.disown()
    by_id.this.disown()
    return index


class VectorIndex:
    """One FAISS index over unit vectors, keyed by int64 image ids. Build with ``VectorIndex.build``."""

    def __init__(
        self,
        index: faiss.Index,
        *,
        dim: int,
        factory: str,
        effective_factory: str,
        nprobe: int | None,
        ef_search: int,
        k_factor: float = AUTO_K_FACTOR,
    ) -> None:
        self.dim = int(dim)
        self.factory = factory  # what the gallery asked for
        self.effective_factory = effective_factory  # what was built ("Flat" when IVF could not train)
        # None: the layout's own (auto_nprobe), for "auto" whose list count follows the gallery's size
        self.nprobe = int(nprobe) if nprobe is not None else auto_nprobe(effective_factory)
        self.ef_search = int(ef_search)
        self.k_factor = float(k_factor)  # re-ranked layouts: k * k_factor candidates re-scored exactly
        self._index = index
        self._lock = RWLock()
        self._tombstones: set[int] = set()
        self._tomb_sel: tuple[object, object] | None = None  # (IDSelectorBatch, IDSelectorNot), kept alive
        self._selector_ok = True
        self._ivf = faiss.try_extract_index_ivf(index)
        self._native_ids = self._ivf is not None and not isinstance(index, faiss.IndexIDMap)
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else None
        self._hnsw = inner if isinstance(inner, faiss.IndexHNSW) else None
        # re-ranked IVF (module docstring): the IVF that holds the ids, and the exact vectors by id
        self._base: faiss.Index | None = None
        self._exact: faiss.IndexIDMap2 | None = None
        if isinstance(index, faiss.IndexRefine) and self._ivf is not None:
            exact = faiss.downcast_index(index.refine_index)
            if isinstance(exact, faiss.IndexIDMap2):
                self._base, self._exact = faiss.downcast_index(index.base_index), exact
        if isinstance(inner, faiss.IndexRefine):
            self._selector_ok = False  # IndexRefine ignores the selector an IndexIDMap hands it
        # HNSW has no remove_ids; other layouts are tried and fall back to tombstones if they refuse
        self._can_remove = self._hnsw is None
        self._apply_search_settings()

    # ---------------------------------------------------------------- construction
    @classmethod
    def empty(
        cls,
        dim: int,
        factory: str,
        *,
        nprobe: int | None,
        ef_search: int,
        effective_factory: str | None = None,
        k_factor: float = AUTO_K_FACTOR,
    ) -> VectorIndex:
        """An empty index; IVF-like factories that need training come back as Flat."""
        eff = effective_factory or factory
        if eff == "Flat":
            index = faiss.IndexIDMap(faiss.IndexFlatIP(int(dim)))
        elif refine_base_factory(eff) is not None:
            index = _make_refined(dim, eff)
        else:
            base = _make_base(dim, eff)
            # IVF keeps ids itself; anything else gets an IndexIDMap
            index = base if faiss.try_extract_index_ivf(base) is not None else faiss.IndexIDMap(base)
        return cls(
            index,
            dim=dim,
            factory=factory,
            effective_factory=eff,
            nprobe=nprobe,
            ef_search=ef_search,
            k_factor=k_factor,
        )

    @classmethod
    def build(
        cls,
        dim: int,
        factory: str,
        *,
        nprobe: int | None,
        ef_search: int,
        count: int,
        train_sample: Callable[[int], np.ndarray],
        chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
        layout: str | None = None,
        k_factor: float = AUTO_K_FACTOR,
    ) -> VectorIndex:
        """Build from the stored vectors: train if the factory needs it and there are enough, add all.

        ``train_sample(n)`` returns up to n stored vectors (n, dim); ``chunks()`` yields (ids, vectors).
        ``layout`` is what to build when it is not ``factory`` itself ("auto" picks one by size).
        """
        layout = layout or factory
        if factory == AUTO:
            layout = fit_auto_layout(dim, layout)
        effective = layout
        if layout != "Flat":
            base = _make_base(dim, layout)
            need = min_training_points(base, layout)
            if need and count < need:
                if count:
                    log.warning(
                        "index_factory %r needs at least %d vectors to train, the gallery has %d: "
                        "using an exact Flat index until then (trained at the next save() or open)",
                        layout,
                        need,
                        count,
                    )
                else:
                    log.info("empty gallery: index_factory %r starts as Flat until it can be trained", layout)
                effective = "Flat"
        vi = cls.empty(
            dim, factory, nprobe=nprobe, ef_search=ef_search, effective_factory=effective, k_factor=k_factor
        )
        if not vi._index.is_trained:
            ivf = vi._ivf
            cap = _MAX_POINTS_PER_CENTROID * int(ivf.nlist) if ivf is not None else 100_000
            cap = max(cap, min_training_points(vi._index, layout))
            x = np.ascontiguousarray(train_sample(min(count, cap)), dtype=np.float32)
            log.info("training %s on %d vectors", layout, x.shape[0])
            vi._index.train(x)
        for ids, vecs in chunks():
            if len(ids):
                x = np.ascontiguousarray(vecs, dtype=np.float32)
                vi._add(x, np.ascontiguousarray(ids, dtype=np.int64))
        return vi

    def _apply_search_settings(self) -> None:
        if self._ivf is not None:
            self._ivf.nprobe = self.nprobe
        if self._hnsw is not None:
            self._hnsw.hnsw.efSearch = self.ef_search
        if self._exact is not None:
            self._index.k_factor = self.k_factor  # what the container saves; search uses self.k_factor

    # ---------------------------------------------------------------- state
    @property
    def ntotal(self) -> int:
        """Live vectors (tombstoned ones excluded)."""
        return int(self._index.ntotal) - len(self._tombstones)

    @property
    def tombstone_count(self) -> int:
        return len(self._tombstones)

    @property
    def needs_compaction(self) -> bool:
        n = int(self._index.ntotal)
        return bool(self._tombstones) and len(self._tombstones) > TOMBSTONE_COMPACT_FRACTION * max(n, 1)

    @property
    def is_fallback(self) -> bool:
        """An explicit factory that could not train yet ("auto" picks its layout, never falls back)."""
        return self.factory != AUTO and self.effective_factory != self.factory

    def ids(self) -> np.ndarray:
        """Sorted live ids actually held by FAISS (read from the index itself, for consistency checks)."""
        with self._lock.read():
            if self._native_ids:
                ivf = self._ivf
                parts = []
                invlists = ivf.invlists
                for list_no in range(ivf.nlist):
                    size = invlists.list_size(list_no)
                    if size:
                        ptr = invlists.get_ids(list_no)
                        parts.append(faiss.rev_swig_ptr(ptr, size).copy())
                        invlists.release_ids(list_no, ptr)
                ids = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
            else:
                ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
            if self._tombstones:
                ids = ids[~np.isin(ids, np.fromiter(self._tombstones, dtype=np.int64))]
        return np.sort(ids)

    # ---------------------------------------------------------------- mutation
    def add(
        self, vectors: np.ndarray, ids: np.ndarray, collections: str | Sequence[str] | None = None
    ) -> None:
        """Add ``vectors`` (n, dim) under ``ids``. ``collections`` is ignored: FAISS filters a
        collection by its id list (``AllowedIds``); the argument exists for MilvusIndex, which keeps
        each collection in its own partition, so one change callback serves both."""
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        i = np.ascontiguousarray(ids, dtype=np.int64)
        with self._lock.write():
            self._add(x, i)

    def _add(self, x: np.ndarray, ids: np.ndarray) -> None:
        if self._exact is not None:  # both parts, the container's count after them
            self._base.add_with_ids(x, ids)
            self._exact.add_with_ids(x, ids)
            self._index.ntotal = self._base.ntotal
        else:
            self._index.add_with_ids(x, ids)

    def remove(self, ids: Iterable[int]) -> None:
        """Remove ids (Flat / IVF) or tombstone them (HNSW and other indexes without remove_ids)."""
        arr = np.asarray(sorted({int(i) for i in ids}), dtype=np.int64)
        if not arr.size:
            return
        with self._lock.write():
            if self._exact is not None:
                self._base.remove_ids(arr)
                self._exact.remove_ids(arr)
                self._index.ntotal = self._base.ntotal
                return
            if self._can_remove:
                try:
                    self._index.remove_ids(arr)  # throws before changing anything when unsupported
                    return
                except RuntimeError:
                    log.info("index %r cannot remove ids: tombstoning deletes", self.effective_factory)
                    self._can_remove = False
            self._tombstones.update(int(i) for i in arr)
            # built here, under the exclusive lock, so concurrent searches share one live selector;
            # the tuple keeps the inner IDSelectorBatch alive as long as the IDSelectorNot using it
            batch = faiss.IDSelectorBatch(np.fromiter(self._tombstones, dtype=np.int64))
            self._tomb_sel = (batch, faiss.IDSelectorNot(batch))

    # ---------------------------------------------------------------- search
    def _params(self, sel: object | None) -> faiss.SearchParameters | None:
        if self._ivf is not None:
            return (
                faiss.SearchParametersIVF(nprobe=self.nprobe, sel=sel)
                if sel is not None
                else faiss.SearchParametersIVF(nprobe=self.nprobe)
            )
        if self._hnsw is not None:
            return (
                faiss.SearchParametersHNSW(efSearch=self.ef_search, sel=sel)
                if sel is not None
                else faiss.SearchParametersHNSW(efSearch=self.ef_search)
            )
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def _tombstone_selector(self) -> tuple[object, object] | None:
        """(IDSelectorBatch, IDSelectorNot) excluding tombstones; hold the tuple while searching."""
        return self._tomb_sel if self._tombstones else None

    def search(
        self, query: np.ndarray, k: int, allowed: AllowedIds | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) for one query (1, dim), best first, restricted to ``allowed`` if given."""
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        with self._lock.read():
            n_live = self.ntotal
            if allowed is not None:
                n_live = min(n_live, len(allowed))
            k = min(int(k), n_live)
            if k <= 0:
                return np.empty(0, dtype=np.float32), np.empty(0, dtype=np.int64)
            if self._selector_ok:
                tomb = self._tombstone_selector()  # local ref keeps both selectors alive
                sel = tomb[1] if tomb is not None else None
                if allowed is not None:  # collection ids come from SQLite: no deleted ids in them
                    sel = allowed.selector()
                try:
                    params = self._params(sel)
                    dist, lab = self._search_index(q, k, params)
                    return self._clean(dist[0], lab[0])
                except RuntimeError as exc:
                    if sel is None:
                        raise
                    log.warning(
                        "index %r does not take ID selectors (%s); filtering by over-fetching",
                        self.effective_factory,
                        str(exc).splitlines()[-1],
                    )
                    self._selector_ok = False
            return self._search_overfetch(q, k, allowed)

    def _search_overfetch(
        self, q: np.ndarray, k: int, allowed: AllowedIds | None
    ) -> tuple[np.ndarray, np.ndarray]:
        total = int(self._index.ntotal)
        fetch = min(total, max(4 * k, k + len(self._tombstones)))
        tomb = np.fromiter(self._tombstones, dtype=np.int64) if self._tombstones else None
        while True:
            dist, lab = self._search_index(q, fetch, self._params(None))
            scores, ids = self._clean(dist[0], lab[0])
            keep = np.ones(ids.shape, dtype=bool)
            if allowed is not None:
                keep &= np.isin(ids, allowed.ids)
            if tomb is not None:
                keep &= ~np.isin(ids, tomb)
            if keep.sum() >= k or fetch >= total:
                return scores[keep][:k], ids[keep][:k]
            fetch = min(total, fetch * 4)

    def _search_index(
        self, q: np.ndarray, k: int, params: faiss.SearchParameters | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``index.search`` for one query; a re-ranked layout takes ``k * k_factor`` candidates from
        the IVF (with ``params``: nprobe, selector) and re-scores them exactly (module docstring)."""
        if self._exact is None:
            return _numpy_search(self._index, q, k, params)
        fetch = min(int(self._base.ntotal), max(k, math.ceil(k * self.k_factor)))
        _, lab = _numpy_search(self._base, q, fetch, params)
        cand = lab[0][lab[0] >= 0]
        dist = np.full((1, k), -np.inf, dtype=np.float32)
        out = np.full((1, k), -1, dtype=np.int64)
        if cand.size:
            scores = self._exact.reconstruct_batch(cand) @ q[0]
            best = np.argsort(-scores, kind="stable")[:k]
            dist[0, : best.size], out[0, : best.size] = scores[best], cand[best]
        return dist, out

    @staticmethod
    def _clean(dist: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ok = lab >= 0
        return dist[ok].astype(np.float32), lab[ok].astype(np.int64)

    # ---------------------------------------------------------------- persistence
    def save(self, path: Path, tag: dict) -> None:
        """Write the index and its tag (sidecar ``<path>.json``) atomically; the tag carries the file hash.

        Crash between the two renames leaves a sidecar whose hash does not match: the next open rebuilds.
        """
        if self._tombstones:
            raise RuntimeError("compact the index before saving it (tombstones present)")
        digest: dict[str, str] = {}

        def _write_index(tmp: Path) -> None:
            with self._lock.read():
                faiss.write_index(self._index, str(tmp))
            digest["sha256"] = file_sha256(tmp)

        atomic_write(path, _write_index, sync_dir=False)
        full = dict(
            tag,
            format=TAG_FORMAT,
            sha256=digest["sha256"],
            factory=self.factory,
            effective_factory=self.effective_factory,
            dim=self.dim,
        )
        sidecar = sidecar_path(path)

        def _write_tag(tmp: Path) -> None:
            tmp.write_text(json.dumps(full, sort_keys=True, indent=1))

        atomic_write(sidecar, _write_tag, sync_dir=False)
        fsync_dir(path.parent)

    @classmethod
    def load(
        cls, path: Path, expected_tag: dict, *, factory: str, nprobe: int | None, ef_search: int
    ) -> VectorIndex | None:
        """Load the saved index if its tag matches ``expected_tag`` and its hash checks; else None."""
        remove_stale_temps(path.parent, path.name)
        remove_stale_temps(path.parent, sidecar_path(path).name)
        sidecar = sidecar_path(path)
        if not path.exists() or not sidecar.exists():
            log.info("no saved FAISS index at %s", path)
            return None
        try:
            tag = json.loads(sidecar.read_text())
        except (OSError, ValueError) as exc:
            log.warning("unreadable FAISS tag %s (%s)", sidecar, exc)
            return None
        want = dict(expected_tag, format=TAG_FORMAT, factory=factory)
        stale = {k: (tag.get(k), v) for k, v in want.items() if tag.get(k) != v}
        if stale:
            log.info("saved FAISS index is stale: %s", stale)
            return None
        try:
            if file_sha256(path) != tag.get("sha256"):
                log.warning("saved FAISS index %s does not match its checksum", path)
                return None
            index = faiss.read_index(str(path))
        except (OSError, RuntimeError) as exc:
            log.warning("unreadable FAISS index %s (%s)", path, exc)
            return None
        if index.d != want.get("dim") or index.ntotal != want.get("count"):
            log.warning(
                "saved FAISS index %s has d=%d ntotal=%d, expected %s",
                path,
                index.d,
                index.ntotal,
                {k: want.get(k) for k in ("dim", "count")},
            )
            return None
        eff = tag.get("effective_factory", factory)
        return cls(
            index, dim=index.d, factory=factory, effective_factory=eff, nprobe=nprobe, ef_search=ef_search
        )


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def remove_saved(path: Path) -> None:
    """Forget the saved index (e.g. before a reindex swaps the vectors)."""
    for p in (sidecar_path(path), path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
    fsync_dir(path.parent)
