"""The vectors in Milvus instead of in-process FAISS, for galleries that outgrow one host.

Selected by ``CXR_REID_VECTOR_URL`` (``parse_vector_url``): ``milvus://[user:password@]host[:19530][/db]``
is a Milvus server; ``milvus-lite:///abs/path/file.db`` or a bare path ending in ``.db`` is Milvus Lite
(pymilvus runs it in-process on that path, a directory despite the suffix). Both go through the same
``pymilvus.MilvusClient`` code.

Like the FAISS index this is a cache: SQL (SQLite / PostgreSQL) holds every image row and its vector,
and Milvus is fed from it. Hence:
- writes are idempotent: ``add`` upserts by image id, ``remove`` of a missing id is a no-op, so several
  replicas may apply the same change-log entry, and a full re-feed from SQL is always safe;
- after ``add`` / ``remove`` return, a search sees them: collections are created with consistency
  level "Strong" and every search and count asks for it too (a server then waits for its own
  timestamp; Milvus Lite applies writes to its memtable synchronously, so it needs no flush);
- ``MilvusIndex.open(..., expected_count=)`` compares with the SQL count and sets ``stale``; the
  caller then re-feeds (``reconcile`` says which ids to add and drops the extra ones).

Layout: one Milvus collection per gallery *and model* (``collection_name``: gallery id + model id +
dim, so a new network means a new collection and two networks' vectors never mix), one partition per
cxr-reid collection (``partition_name``: a hash of the name, since cxr-reid names may hold characters
Milvus identifiers cannot). See ``MilvusIndex.search`` for how collection filters map onto partitions,
and ``choose_index`` for the index type.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import numpy as np

from .faiss_index import AllowedIds

log = logging.getLogger(__name__)

DEFAULT_PORT = 19530
ID_FIELD = "id"
VECTOR_FIELD = "vector"
METRIC = "IP"  # unit vectors: inner product = cosine, the score FAISS gives and the thresholds expect
CONSISTENCY = "Strong"
DEFAULT_PARTITION = "_default"  # where vectors added without a collection go
WRITE_BATCH = 4096  # rows a request: 4096 x 512 float32 = 8 MiB, under gRPC's 64 MiB limit
FILTER_MAX_IDS = 8192  # ids in one "id in [...]" filter expression (AllowedIds path)
MAX_TOPK = 16384  # Milvus's limit on k
# Milvus Lite searches rows still in its memtable row by row in Python (~50 us a row a search, against
# ~2 us once flushed into a segment: 3000 rows, 155 ms vs 8 ms), so the index flushes Lite once this
# many rows were written since the last flush. A server is never flushed by hand (Milvus seals
# segments itself and rate-limits flush); Strong consistency already makes writes visible.
LITE_FLUSH_ROWS = 1024
# choose_index: exact FLAT below this many vectors (as index/faiss_index.py AUTO_FLAT_MAX)
FLAT_MAX = 10_000
# a Milvus server builds one index per sealed segment, 1 GiB by default: ~500k 512-d float32 vectors
SERVER_SEGMENT_ROWS = 500_000
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class MilvusIndexError(RuntimeError):
    """Milvus could not do what was asked; the message says what to check."""


# ---------------------------------------------------------------------------------------------- URLs
@dataclass(frozen=True)
class VectorUrl:
    """A parsed ``CXR_REID_VECTOR_URL``: ``kind`` "server" (``uri``, ``token``, ``db_name``) or "lite"
    (``path``; ``uri`` is the path pymilvus takes). ``str()`` hides the password."""

    kind: Literal["server", "lite"]
    uri: str
    token: str = ""
    db_name: str = ""
    path: Path | None = None

    def __str__(self) -> str:
        if self.kind == "lite":
            return f"milvus-lite://{self.path}"
        user = self.token.split(":", 1)[0] + ":***@" if self.token else ""
        host = self.uri.split("://", 1)[1]
        return f"milvus://{user}{host}" + (f"/{self.db_name}" if self.db_name else "")


def parse_vector_url(url: str) -> VectorUrl:
    """Validate a vector-store URL; ValueError says what is wrong and what a good one looks like."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("the vector URL is empty: use milvus://host:19530 or milvus-lite:///path/file.db")
    url = url.strip()
    if "://" not in url:  # a bare path: Milvus Lite
        return _lite_url(Path(url).expanduser(), url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "milvus-lite":
        if parts.netloc:
            raise ValueError(
                f"{url!r}: milvus-lite URLs take an absolute path with three slashes, "
                "milvus-lite:///path/file.db"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"{url!r}: milvus-lite URLs take no ?query or #fragment")
        return _lite_url(Path(unquote(parts.path)), url)
    if scheme == "milvus":
        if parts.query or parts.fragment:
            raise ValueError(f"{url!r}: milvus URLs take no ?query or #fragment")
        host = parts.hostname
        if not host:
            raise ValueError(f"{url!r}: no host; use milvus://host:19530")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError as exc:
            raise ValueError(f"{url!r}: the port is not a number from 1 to 65535") from exc
        if port == 0:
            raise ValueError(f"{url!r}: the port is not a number from 1 to 65535")
        segments = [s for s in parts.path.split("/") if s]
        if len(segments) > 1:
            raise ValueError(f"{url!r}: the path names one database at most, milvus://host:19530/db")
        db_name = unquote(segments[0]) if segments else ""
        if db_name and not _IDENT.fullmatch(db_name):
            raise ValueError(f"{url!r}: database name {db_name!r} is not a Milvus identifier")
        token = ""
        if parts.username:
            token = unquote(parts.username) + (":" + unquote(parts.password) if parts.password else "")
        netloc_host = f"[{host}]" if ":" in host else host
        return VectorUrl("server", f"http://{netloc_host}:{port}", token=token, db_name=db_name)
    raise ValueError(
        f"unsupported vector URL scheme {parts.scheme!r}: use milvus://host:19530 (a Milvus server) "
        "or milvus-lite:///path/file.db / a path ending in .db (Milvus Lite)"
    )


def _lite_url(path: Path, url: str) -> VectorUrl:
    if not str(path) or str(path) in (".", "/"):
        raise ValueError(f"{url!r}: no file path; use milvus-lite:///path/file.db")
    if path.suffix != ".db":
        raise ValueError(f"{url!r}: a Milvus Lite path must end in .db (pymilvus recognises Lite by it)")
    path = path.absolute()
    return VectorUrl("lite", str(path), path=path)


# ---------------------------------------------------------------------------------------------- names
def _digest(*parts: str, n: int = 16) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:n]


def collection_name(gallery_id: str, model_id: str, dim: int) -> str:
    """The Milvus collection of one gallery's vectors of one model: a readable prefix of the gallery id
    plus a hash of (gallery id, model id, dim), so another model or dim never shares it. Deterministic;
    always a valid Milvus identifier (letters, digits, underscores, at most 255 characters)."""
    if not gallery_id or not model_id:
        raise ValueError("collection_name needs a gallery id and a model id")
    slug = re.sub(r"[^A-Za-z0-9]+", "_", gallery_id).strip("_")[:40]
    return f"cxr_{slug}_{_digest(gallery_id, model_id, str(int(dim)))}_d{int(dim)}"


def partition_name(collection: str) -> str:
    """The Milvus partition of a cxr-reid collection: "c_" + 24 hex digits of the name's SHA-256.
    Deterministic (every replica maps a name alike) and valid whatever the name holds; 96 bits make a
    collision between two collection names of one gallery negligible."""
    if not isinstance(collection, str) or not collection:
        raise ValueError("a collection name must be a non-empty string")
    return "c_" + _digest(collection, n=24)


# ---------------------------------------------------------------------------------------------- index type
@dataclass(frozen=True)
class IndexChoice:
    """An index type with its build and search parameters, and why it was chosen."""

    index_type: str
    build_params: dict[str, Any]
    search_params: dict[str, Any]
    reason: str


def choose_index(count: int, *, lite: bool) -> IndexChoice:
    """The index type for a gallery of about ``count`` vectors.

    Milvus Lite (3.x) builds FLAT / BRUTE_FORCE, HNSW, HNSW_SQ, IVF_FLAT, IVF_SQ8 (and AUTOINDEX = HNSW)
    per segment of at most 100k rows, but every search also walks every in-scope row in Python
    (dedup and delete checks, about 1-3 us a row), so an ANN index cannot make a Lite search
    sublinear: Lite always gets FLAT, exact, with scores identical to FAISS Flat and no build time.
    (bench/milvus.py measures FLAT and HNSW on Lite side by side.)

    A Milvus server: FLAT below FLAT_MAX (exact; a scan of 10k vectors is about 2 ms), then IVF_FLAT,
    the same pick as the FAISS side (index/faiss_index.py AUTO_FLAT_MAX: IVF-Flat kept recall@10 >=
    0.95 at 1e5 and 1e6 where HNSW32 fell to 0.84 at 1e6, and its scores are exact cosines, which the
    FAR thresholds need). Milvus indexes each sealed segment (~SERVER_SEGMENT_ROWS vectors) on its
    own, so nlist is ~4 sqrt(rows of a segment) and nprobe max(64, nlist / 32), as the FAISS figures.
    """
    n = max(int(count), 0)
    if lite:
        return IndexChoice("FLAT", {}, {}, "Milvus Lite: search is O(n) in Python anyway; FLAT is exact")
    if n < FLAT_MAX:
        return IndexChoice("FLAT", {}, {}, f"under {FLAT_MAX} vectors: exact scan, a few ms")
    rows = min(n, SERVER_SEGMENT_ROWS)
    nlist = int(2 ** round(math.log2(4.0 * math.sqrt(rows))))
    nprobe = max(64, nlist // 32)
    return IndexChoice(
        "IVF_FLAT",
        {"nlist": nlist},
        {"nprobe": nprobe},
        f"{n} vectors: IVF_FLAT nlist {nlist} (~4 sqrt(segment rows)), nprobe {nprobe}",
    )


# ---------------------------------------------------------------------------------------------- the index
def _connect(url: VectorUrl, timeout: float) -> Any:
    try:
        from pymilvus import MilvusClient
    except ImportError as exc:
        raise MilvusIndexError(
            "CXR_REID_VECTOR_URL names Milvus but pymilvus is not installed: pip install 'cxr-reid[milvus]'"
        ) from exc
    if url.kind == "lite":
        if not url.path.parent.is_dir():
            raise MilvusIndexError(
                f"Milvus Lite: the folder {url.path.parent} does not exist; "
                "create it or fix CXR_REID_VECTOR_URL"
            )
        try:
            return MilvusClient(url.uri)
        except Exception as exc:
            raise MilvusIndexError(
                f"could not open Milvus Lite at {url.path} ({exc}); is milvus-lite installed "
                "(pip install 'cxr-reid[milvus]') and is no other process holding the file (its LOCK)?"
            ) from exc
    try:
        return MilvusClient(uri=url.uri, token=url.token, db_name=url.db_name, timeout=timeout)
    except Exception as exc:
        raise MilvusIndexError(
            f"could not reach the Milvus server {url} within {timeout:g} s ({exc}); check that it runs "
            "and that host, port, credentials and database in CXR_REID_VECTOR_URL are right. The gallery "
            "in SQL is untouched: fix the URL or unset it to use the in-process FAISS index"
        ) from exc


class MilvusIndex:
    """One gallery's vectors of one model in one Milvus collection; open with ``MilvusIndex.open``.

    The surface of ``index.faiss_index.VectorIndex`` that LiveIndex and Gallery use: ``add``, ``remove``,
    ``search``, ``ntotal``, ``ids``, ``dim``, ``effective_factory`` (and the no-op ``tombstone_count``,
    ``needs_compaction``, ``is_fallback``), plus the collection (partition) of each vector.
    Thread-safe as far as pymilvus's client is (it is); the partition cache has its own lock.
    """

    def __init__(self, client: Any, url: VectorUrl, name: str, dim: int, choice: IndexChoice) -> None:
        self._client = client
        self.url = url
        self.name = name  # the Milvus collection
        self.dim = int(dim)
        self.choice = choice
        self.stale = False  # set by open(expected_count=) when Milvus and SQL disagree on the count
        self._partitions: set[str] = set()
        self._plock = threading.Lock()
        self._unflushed = 0  # rows written to Milvus Lite since its last flush

    # ---------------------------------------------------------------- open
    @classmethod
    def open(
        cls,
        url: str,
        name: str,
        dim: int,
        *,
        model_id: str,
        expected_count: int | None = None,
        timeout: float = 10.0,
        choice: IndexChoice | None = None,
    ) -> MilvusIndex:
        """Connect and open (creating if need be) the collection of gallery ``name`` and ``model_id``.

        ``expected_count``: how many vectors SQL holds; it sizes the index of a new collection
        (``choose_index``) and, when Milvus holds another count, sets ``stale`` (log warning) so the
        caller re-feeds from SQL. ``choice`` overrides ``choose_index`` for a new collection (benchmarks);
        an existing collection keeps the index it was built with. Raises ValueError for a bad URL,
        MilvusIndexError when Milvus fails.
        """
        parsed = parse_vector_url(url)
        if int(dim) <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        client = _connect(parsed, timeout)
        cname = collection_name(name, model_id, dim)
        choice = choice or choose_index(expected_count or 0, lite=parsed.kind == "lite")
        idx = cls(client, parsed, cname, dim, choice)
        try:
            idx._create_or_load()
            idx._refresh_partitions()
            if expected_count is not None:
                have = idx.ntotal
                if have != int(expected_count):
                    log.warning(
                        "Milvus collection %s holds %d vectors, SQL %d: re-feed it from SQL (reconcile)",
                        cname,
                        have,
                        expected_count,
                    )
                    idx.stale = True
        except MilvusIndexError:
            raise
        except Exception as exc:
            raise MilvusIndexError(f"could not open Milvus collection {cname} at {parsed}: {exc}") from exc
        log.info("Milvus collection %s at %s: %s (%s)", cname, parsed, idx.effective_factory, choice.reason)
        return idx

    def _create_or_load(self) -> None:
        c = self._client
        if c.has_collection(self.name):
            desc = c.describe_collection(self.name)
            fields = {f["name"]: f for f in desc.get("fields", [])}
            have_dim = int(fields.get(VECTOR_FIELD, {}).get("params", {}).get("dim", -1))
            if have_dim != self.dim:
                raise MilvusIndexError(
                    f"Milvus collection {self.name} holds {have_dim}-d vectors, not {self.dim}-d: "
                    "it belongs to another setup; drop it or use another gallery id"
                )
            try:
                info = c.describe_index(self.name, VECTOR_FIELD) or {}
                if info.get("index_type"):
                    self.choice = IndexChoice(
                        str(info["index_type"]),
                        {},
                        self.choice.search_params if info["index_type"] == self.choice.index_type else {},
                        "existing collection: its index as built",
                    )
            except Exception:
                log.debug("no index description for %s", self.name, exc_info=True)
            c.load_collection(self.name)  # a reopened collection starts released
            return
        from pymilvus import DataType

        schema = c.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(ID_FIELD, DataType.INT64, is_primary=True)
        schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=self.dim)
        params = c.prepare_index_params()
        params.add_index(
            field_name=VECTOR_FIELD,
            index_type=self.choice.index_type,
            metric_type=METRIC,
            params=self.choice.build_params,
        )
        c.create_collection(self.name, schema=schema, index_params=params, consistency_level=CONSISTENCY)
        c.load_collection(self.name)
        log.info("created Milvus collection %s (%s)", self.name, self.choice.reason)

    def drop(self) -> None:
        """Delete this collection from Milvus (after a reindex moved the gallery to another model's)."""
        self._call("drop", self._client.drop_collection, self.name)

    def close(self) -> None:
        """Close the client (a Milvus Lite file stays open in this process until it exits)."""
        try:
            self._client.close()
        except Exception:
            log.debug("closing the Milvus client failed", exc_info=True)

    # ---------------------------------------------------------------- partitions
    def _refresh_partitions(self) -> None:
        names = set(self._client.list_partitions(self.name))
        with self._plock:
            self._partitions = names

    def _has_partition(self, part: str) -> bool:
        with self._plock:
            if part in self._partitions:
                return True
        if self._client.has_partition(self.name, part):  # another replica may have made it
            with self._plock:
                self._partitions.add(part)
            return True
        return False

    def _ensure_partition(self, part: str) -> None:
        if part == DEFAULT_PARTITION or self._has_partition(part):
            return
        try:
            self._client.create_partition(self.name, part)
        except Exception:
            if not self._client.has_partition(self.name, part):  # not a race with another replica
                raise
        with self._plock:
            self._partitions.add(part)

    def collections_held(self) -> set[str]:
        """Milvus partitions of this collection (hashed names; ``partition_name`` maps a name to one)."""
        self._refresh_partitions()
        with self._plock:
            return set(self._partitions)

    # ---------------------------------------------------------------- state
    @property
    def effective_factory(self) -> str:
        return f"milvus-{self.url.kind}:{self.choice.index_type}"

    tombstone_count = 0  # Milvus handles its own deletes
    needs_compaction = False
    is_fallback = False

    @property
    def ntotal(self) -> int:
        """Live vectors (an exact count(*) query with Strong consistency, not the lagging row stats).
        A round trip, and O(n) on Milvus Lite (~10 ms at 20k vectors): not for every search."""
        return self._count()

    def count(self, collection: str | None = None) -> int:
        """Live vectors of one cxr-reid collection (its partition), or all with None."""
        return self._count(collection)

    def _count(self, collection: str | None = None) -> int:
        kwargs: dict[str, Any] = {}
        if collection is not None:
            part = partition_name(collection)
            if not self._has_partition(part):
                return 0
            if self.url.kind == "lite":
                # Milvus Lite 3.2 answers count(*) without a filter from the whole collection, whatever
                # the partitions asked; its partition statistics are exact (deletes applied)
                stats = self._call("count", self._client.get_partition_stats, self.name, part)
                return int(stats.get("row_count", 0))
            kwargs["partition_names"] = [part]
        res = self._call(
            "count",
            self._client.query,
            self.name,
            filter="",
            output_fields=["count(*)"],
            consistency_level=CONSISTENCY,
            **kwargs,
        )
        return int(res[0]["count(*)"]) if res else 0

    def ids(self, collection: str | None = None) -> np.ndarray:
        """Sorted ids held by Milvus (all, or one collection's): a query iterator on a server, one
        unbounded query on Milvus Lite."""
        kwargs: dict[str, Any] = {}
        if collection is not None:
            part = partition_name(collection)
            if not self._has_partition(part):
                return np.empty(0, dtype=np.int64)
            kwargs["partition_names"] = [part]
        if self.url.kind == "lite":
            # Milvus Lite takes an unbounded query; its server lacks the AllocTimestamp call the
            # iterator makes first (it falls back, but the gRPC server logs a traceback each time)
            rows = self._call(
                "ids",
                self._client.query,
                self.name,
                filter="",
                output_fields=[ID_FIELD],
                limit=2**62,
                consistency_level=CONSISTENCY,
                **kwargs,
            )
            return np.sort(np.fromiter((r[ID_FIELD] for r in rows), dtype=np.int64, count=len(rows)))
        it = self._call(
            "ids",
            self._client.query_iterator,
            self.name,
            batch_size=WRITE_BATCH * 4,
            filter="",
            output_fields=[ID_FIELD],
            consistency_level=CONSISTENCY,
            **kwargs,
        )
        parts: list[np.ndarray] = []
        try:
            while batch := it.next():
                parts.append(np.fromiter((r[ID_FIELD] for r in batch), dtype=np.int64, count=len(batch)))
        finally:
            it.close()
        return np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)

    # ---------------------------------------------------------------- mutation
    def add(
        self, vectors: np.ndarray, ids: np.ndarray, collections: str | Sequence[str] | None = None
    ) -> None:
        """Upsert ``vectors`` (n, dim) under image ``ids`` (n,): adding an id again replaces it.

        ``collections``: the cxr-reid collection of all rows (a str) or of each row (a sequence of n);
        each goes to that collection's partition. None puts them in the default partition, where only
        unfiltered and ``allowed``-filtered searches find them. An image id never changes collection
        in cxr-reid; if one did, Milvus Lite moves it, but a Milvus server may keep the old copy too
        (its upsert deletes within the target partition): remove it first.
        """
        x = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        i = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if x.shape[0] != i.shape[0]:
            raise ValueError(f"{x.shape[0]} vectors but {i.shape[0]} ids")
        if not i.size:
            return
        if collections is None or isinstance(collections, str):
            groups = {DEFAULT_PARTITION if collections is None else partition_name(collections): slice(None)}
        else:
            names = np.asarray(list(collections), dtype=object)
            if names.shape[0] != i.shape[0]:
                raise ValueError(f"{i.shape[0]} ids but {names.shape[0]} collections")
            groups = {partition_name(str(c)): np.flatnonzero(names == c) for c in dict.fromkeys(names)}
        for part, rows in groups.items():
            self._call("create a partition", self._ensure_partition, part)
            gx, gi = x[rows], i[rows]
            for s in range(0, gi.shape[0], WRITE_BATCH):
                data = [
                    {ID_FIELD: int(k), VECTOR_FIELD: v}
                    for k, v in zip(gi[s : s + WRITE_BATCH], gx[s : s + WRITE_BATCH], strict=True)
                ]
                self._call("upsert", self._client.upsert, self.name, data, partition_name=part)
        self._written(i.size)

    def remove(self, ids: Iterable[int]) -> None:
        """Delete ids from every partition; ids Milvus does not hold are fine."""
        arr = sorted({int(i) for i in ids})
        for s in range(0, len(arr), WRITE_BATCH):
            self._call("delete", self._client.delete, self.name, ids=arr[s : s + WRITE_BATCH])
        self._written(len(arr))

    def _written(self, rows: int) -> None:
        if self.url.kind != "lite":
            return
        with self._plock:
            self._unflushed += rows
            due = self._unflushed >= LITE_FLUSH_ROWS
            if due:
                self._unflushed = 0
        if due:
            self.flush()

    def flush(self) -> None:
        """Seal what was written into segments (persisted; on Lite also much faster to search). Not
        needed for visibility: searches are Strong."""
        self._call("flush", self._client.flush, self.name)

    def reconcile(self, sql_ids: np.ndarray) -> np.ndarray:
        """Make Milvus hold no id SQL lacks; returns the SQL ids Milvus lacks (the caller adds those
        from SQL, with their collections). Clears ``stale`` when nothing is missing."""
        sql = np.unique(np.asarray(sql_ids, dtype=np.int64))
        have = self.ids()
        extra = np.setdiff1d(have, sql, assume_unique=True)
        if extra.size:
            log.info("removing %d ids from Milvus that SQL no longer holds", extra.size)
            self.remove(extra.tolist())
        missing = np.setdiff1d(sql, have, assume_unique=True)
        self.stale = bool(missing.size)
        return missing

    # ---------------------------------------------------------------- search
    def search(
        self,
        query: np.ndarray,
        k: int,
        allowed: AllowedIds | None = None,
        *,
        collection: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) for one query (1, dim), best first; scores are inner products (cosines).

        Filtering, two ways:
        - ``collection=`` (preferred with Milvus): searches that collection's partition only, so the
          cost follows the collection's size and no id list crosses the wire. It requires the vectors
          to have been added with their collection (``add(..., collections=)``).
        - ``allowed=`` (what ``Gallery.search`` passes to FAISS today, ids only, no name): an
          ``id in [...]`` filter expression, FILTER_MAX_IDS ids a request; a larger set first tries
          over-fetching an unfiltered search, then falls back to one filtered search per chunk of ids,
          merged. Correct, but slower for big collections: pass ``collection`` instead.
        With both, the partition is searched and the hits are also checked against ``allowed``.
        """
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)[0]
        k = min(int(k), MAX_TOPK)
        empty = np.empty(0, dtype=np.float32), np.empty(0, dtype=np.int64)
        if k <= 0 or (allowed is not None and len(allowed) == 0):
            return empty
        if collection is not None:
            part = partition_name(collection)
            if not self._has_partition(part):
                return empty
            scores, ids = self._search(q, k, partitions=[part])
            if allowed is not None:
                keep = np.isin(ids, allowed.ids)
                scores, ids = scores[keep], ids[keep]
            return scores, ids
        if allowed is None:
            return self._search(q, k)
        ids_allowed = np.asarray(allowed.ids, dtype=np.int64)
        if ids_allowed.size <= FILTER_MAX_IDS:
            return self._search(q, k, filter_ids=ids_allowed)
        fetch = min(MAX_TOPK, 16 * k)
        scores, ids = self._search(q, fetch)
        keep = np.isin(ids, ids_allowed)
        if keep.sum() >= k:
            return scores[keep][:k], ids[keep][:k]
        chunks = [
            self._search(q, k, filter_ids=ids_allowed[s : s + FILTER_MAX_IDS])
            for s in range(0, ids_allowed.size, FILTER_MAX_IDS)
        ]
        scores = np.concatenate([c[0] for c in chunks])
        ids = np.concatenate([c[1] for c in chunks])
        order = np.argsort(-scores, kind="stable")[:k]
        return scores[order], ids[order]

    def _search(
        self,
        q: np.ndarray,
        k: int,
        *,
        partitions: list[str] | None = None,
        filter_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        expr = f"{ID_FIELD} in [{','.join(map(str, filter_ids.tolist()))}]" if filter_ids is not None else ""
        res = self._call(
            "search",
            self._client.search,
            self.name,
            data=[q],
            limit=k,
            filter=expr,
            output_fields=[ID_FIELD],  # [] would return the vectors too
            search_params={"metric_type": METRIC, "params": dict(self.choice.search_params)},
            partition_names=partitions,
            consistency_level=CONSISTENCY,
        )
        hits = res[0] if res else []
        scores = np.fromiter((h["distance"] for h in hits), dtype=np.float32, count=len(hits))
        ids = np.fromiter((h[ID_FIELD] for h in hits), dtype=np.int64, count=len(hits))
        order = np.argsort(-scores, kind="stable")  # Milvus returns best first; make sure
        return scores[order], ids[order]

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MilvusIndexError:
            raise
        except Exception as exc:
            raise MilvusIndexError(
                f"Milvus {what} on {self.name} at {self.url} failed: {exc}. Check that Milvus is up; "
                "SQL still holds every vector, so once it is back a re-feed (reconcile) restores it"
            ) from exc
