"""Near-duplicate images and their clusters: the pair scan behind ``Gallery.duplicates`` and the
union-find that groups its pairs (``cluster_pairs``).

Both work on what the store holds and need no FAISS index: the scan is an exact range search over
a flat copy of one collection's vectors (``faiss_index.pairs_above``), read in one SQLite snapshot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

import numpy as np

from .faiss_index import PairLimitError, pairs_above
from .records import DuplicatePair, GalleryValidationError
from .store import Store


def duplicate_pairs(
    store: Store,
    threshold: float | None,
    *,
    collection: str | None,
    chunk: int,
    row_thresholds: Callable[[np.ndarray, np.ndarray], np.ndarray] | None,
    max_pairs: int | None,
) -> list[DuplicatePair]:
    """Every pair of ``collection``'s images (None: all) whose similarity reaches the threshold,
    each pair once (a < b), best first; see ``Gallery.duplicates`` for the arguments."""
    with store.read_txn() as conn:
        parts = list(store.iter_vectors(collection, conn=conn))
    if not parts:
        return []
    ids = np.concatenate([p[0] for p in parts])
    X = np.ascontiguousarray(np.concatenate([p[1] for p in parts]), dtype=np.float32)
    n = ids.shape[0]
    if n < 2:
        return []
    if row_thresholds is not None:
        limits = np.asarray(row_thresholds(ids, X), dtype=np.float32).reshape(n)
    elif threshold is not None:
        limits = np.full(n, threshold, dtype=np.float32)
    else:
        raise GalleryValidationError("give a threshold or row_thresholds")
    try:
        ia, ib, sc = pairs_above(X, limits, chunk=chunk, max_pairs=max_pairs)
    except PairLimitError as exc:
        raise GalleryValidationError(f"{exc}: raise it (e.g. a lower `far`)") from None
    if not ia.size:
        return []
    order = np.lexsort((ids[ib], ids[ia], -sc))
    records = store.get_many(np.unique(np.concatenate([ids[ia], ids[ib]])).tolist())
    pairs = []
    for j in order:
        a, b = records.get(int(ids[ia[j]])), records.get(int(ids[ib[j]]))
        if a is None or b is None:
            continue
        conflict = a.patient_id is not None and b.patient_id is not None and a.patient_id != b.patient_id
        pairs.append(DuplicatePair(a=a, b=b, score=float(sc[j]), conflict=conflict))
    return pairs


T = TypeVar("T")


class UnionFind(Generic[T]):
    """Disjoint sets of hashable items (path compression): the clusters of the duplicates report here,
    and the copies and linked identities of the dataset audit (``app.analysis.audit``)."""

    def __init__(self) -> None:
        self.parent: dict[T, T] = {}

    def find(self, x: T) -> T:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: T, b: T) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def groups(self) -> list[list[T]]:
        """Every set seen, in the order its first item was seen."""
        out: dict[T, list[T]] = {}
        for x in self.parent:
            out.setdefault(self.find(x), []).append(x)
        return list(out.values())


def cluster_pairs(pairs: Iterable[DuplicatePair]) -> list[list[int]]:
    """Connected components of image ids linked by pairs; largest first, ids ascending."""
    sets: UnionFind[int] = UnionFind()
    for p in pairs:
        sets.union(p.a.image_id, p.b.image_id)
    return sorted((sorted(g) for g in sets.groups()), key=lambda g: (-len(g), g[0]))
