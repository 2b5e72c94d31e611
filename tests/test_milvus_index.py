"""index/milvus_index.py against a real Milvus Lite (pymilvus + milvus-lite, a temp file), no mocks.

Milvus Lite gets a FLAT index (choose_index), so results must equal FAISS exact Flat on the same
vectors: the same ids in the same order and the same scores to 1e-5 (float32 sums in another order);
two neighbours whose scores differ by less than that may swap places.
"""

from __future__ import annotations

import socket
from pathlib import Path

import faiss
import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from index.faiss_index import AllowedIds  # noqa: E402
from index.milvus_index import (  # noqa: E402
    MilvusIndex,
    MilvusIndexError,
    choose_index,
    collection_name,
    parse_vector_url,
    partition_name,
)

DIM = 512
N = 3000
K = 10
TOL = 1e-5
COLLECTIONS = ("default", "site B", "Ünïcode/ü x")


def clustered(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors in patient-like clusters of 4 (genuine cosine ~0.5), and 50 held-out queries."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 4 + 50, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(c: np.ndarray) -> np.ndarray:
        x = c + rng.standard_normal(c.shape).astype(np.float32) / np.sqrt(dim)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    x = draw(np.repeat(centres[: n // 4], 4, axis=0))[:n]
    return x, draw(centres[n // 4 - 50 : n // 4])  # queries: new images of enrolled patients


def flat_search(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    flat = faiss.IndexIDMap(faiss.IndexFlatIP(x.shape[1]))
    flat.add_with_ids(x, ids)
    d, i = flat.search(q.reshape(1, -1), k)
    ok = i[0] >= 0
    return d[0][ok], i[0][ok]


def assert_same(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    gs, gi = got
    ws, wi = want
    assert gi.shape == wi.shape
    np.testing.assert_allclose(gs, ws, atol=TOL)
    assert np.all(np.diff(gs) <= TOL)  # best first
    for pos in np.flatnonzero(gi != wi):  # only near-ties may swap (or trade the k-th place)
        near = [abs(float(ws[j]) - float(ws[pos])) <= TOL for j in (pos - 1, pos + 1) if 0 <= j < len(ws)]
        assert any(near) or pos == len(ws) - 1, (pos, gi, wi, gs, ws)


@pytest.fixture(scope="module")
def data() -> dict:
    x, queries = clustered(N, DIM, seed=0)
    ids = np.arange(1, N + 1, dtype=np.int64) * 7  # sparse ids, as SQL's after deletes
    coll = np.array([COLLECTIONS[i % 3] for i in range(N)], dtype=object)
    return {"x": x, "ids": ids, "coll": coll, "queries": queries}


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory, data: dict) -> MilvusIndex:
    path = tmp_path_factory.mktemp("milvus") / "gallery.db"
    idx = MilvusIndex.open(str(path), "gallery-1", DIM, model_id="model-a", expected_count=0)
    idx.add(data["x"], data["ids"], list(data["coll"]))
    return idx


# ---------------------------------------------------------------------------------------------- pure
def test_parse_vector_url(tmp_path: Path) -> None:
    s = parse_vector_url("milvus://db.example:19531")
    assert (s.kind, s.uri, s.token, s.db_name) == ("server", "http://db.example:19531", "", "")
    s = parse_vector_url("milvus://alice:s%40cret@db.example/cxr")
    assert (s.uri, s.token, s.db_name) == ("http://db.example:19530", "alice:s@cret", "cxr")
    assert "s@cret" not in str(s) and "s%40cret" not in str(s)
    lite = parse_vector_url(f"milvus-lite://{tmp_path}/v.db")
    assert lite.kind == "lite" and lite.path == tmp_path / "v.db"
    assert parse_vector_url(str(tmp_path / "v.db")).path == tmp_path / "v.db"
    bad = {
        "": "empty",
        "   ": "empty",
        "postgresql://h/db": "unsupported",
        "http://h:19530": "unsupported",
        "milvus://": "no host",
        "milvus://:19530": "no host",
        "milvus://h:port": "port",
        "milvus://h:70000": "port",
        "milvus://h:19530/a/b": "one database",
        "milvus://h/bad-name": "identifier",
        "milvus://h:19530?x=1": "query",
        "milvus-lite://relative/v.db": "three slashes",
        "milvus-lite:///tmp/v.sqlite": ".db",
        "/tmp/vectors": ".db",
        "milvus-lite:///": "no file",
    }
    for url, words in bad.items():
        with pytest.raises(ValueError, match=words):
            parse_vector_url(url)


def test_names_are_valid_deterministic_and_separate_models() -> None:
    a = collection_name("gallery/1 é", "model-a", 512)
    assert a == collection_name("gallery/1 é", "model-a", 512)
    assert a != collection_name("gallery/1 é", "model-b", 512)
    assert a != collection_name("gallery/1 é", "model-a", 256)
    assert a != collection_name("gallery/2 é", "model-a", 512)
    parts = {partition_name(c) for c in COLLECTIONS}
    assert len(parts) == 3 and partition_name("site B") == partition_name("site B")
    for name in (a, *parts):
        assert name.isascii() and name.replace("_", "a").isalnum() and not name[0].isdigit()
        assert len(name) <= 255
    with pytest.raises(ValueError):
        partition_name("")


def test_choose_index() -> None:
    assert choose_index(5_000_000, lite=True).index_type == "FLAT"
    assert choose_index(5_000, lite=False).index_type == "FLAT"
    big = choose_index(1_000_000, lite=False)
    assert big.index_type == "IVF_FLAT" and big.build_params["nlist"] == 2048
    assert big.search_params["nprobe"] >= 64


# ---------------------------------------------------------------------------------------------- Milvus Lite
def test_search_equals_faiss_flat(filled: MilvusIndex, data: dict) -> None:
    assert filled.ntotal == N
    assert np.array_equal(filled.ids(), data["ids"])
    assert filled.effective_factory == "milvus-lite:FLAT"
    for q in data["queries"]:
        assert_same(filled.search(q[None, :], K), flat_search(data["x"], data["ids"], q, K))
    assert filled.search(data["queries"][0], 0)[1].size == 0


def test_collection_partitions(filled: MilvusIndex, data: dict) -> None:
    for name in COLLECTIONS:
        mine = data["coll"] == name
        assert filled.count(name) == int(mine.sum())
        assert np.array_equal(filled.ids(name), data["ids"][mine])
        allowed = AllowedIds(data["ids"][mine])
        for q in data["queries"][:15]:
            want = flat_search(data["x"][mine], data["ids"][mine], q, K)
            by_partition = filled.search(q, K, collection=name)
            assert np.isin(by_partition[1], data["ids"][mine]).all()  # never another collection's ids
            assert_same(by_partition, want)
            assert_same(filled.search(q, K, allowed), want)  # the AllowedIds (filter expression) path
    assert filled.search(data["queries"][0], K, collection="never added")[1].size == 0
    assert filled.count("never added") == 0


def test_readd_is_idempotent(filled: MilvusIndex, data: dict) -> None:
    q = data["queries"][3]
    before = filled.search(q, K)
    filled.add(data["x"][:500], data["ids"][:500], list(data["coll"][:500]))  # the same change again
    assert filled.ntotal == N
    assert filled.count(COLLECTIONS[1]) == int((data["coll"] == COLLECTIONS[1]).sum())
    assert_same(filled.search(q, K), before)


def test_delete_then_search(tmp_path: Path, data: dict) -> None:
    idx = MilvusIndex.open(str(tmp_path / "d.db"), "g", DIM, model_id="m")
    x, ids, coll = data["x"][:600], data["ids"][:600], list(data["coll"][:600])
    idx.add(x, ids, coll)
    q = data["queries"][0]
    top = idx.search(q, K)[1]
    gone = np.concatenate([top[:5], ids[100:150]])
    idx.remove([*gone.tolist(), 10**12, -5])  # ids Milvus never held are fine
    idx.remove(gone.tolist())  # and deleting twice too
    keep = ~np.isin(ids, gone)
    assert idx.ntotal == int(keep.sum())
    assert_same(idx.search(q, K), flat_search(x[keep], ids[keep], q, K))
    for name in COLLECTIONS:
        m = keep & (np.asarray(coll, dtype=object) == name)
        assert idx.count(name) == int(m.sum())
        assert_same(idx.search(q, K, collection=name), flat_search(x[m], ids[m], q, K))
    assert idx.reconcile(ids[keep][10:]).size == 0  # SQL lost 10 more: Milvus drops them
    assert idx.ntotal == int(keep.sum()) - 10 and not idx.stale


def test_reopen_keeps_vectors_and_models_get_their_own_collection(tmp_path: Path, data: dict) -> None:
    from milvus_lite import server_manager_instance

    path = tmp_path / "r.db"
    x, ids = data["x"][:400], data["ids"][:400]
    a = MilvusIndex.open(str(path), "g", DIM, model_id="model-a")
    a.add(x, ids, "default")
    b = MilvusIndex.open(f"milvus-lite://{path}", "g", DIM, model_id="model-b")  # a new network
    assert b.name != a.name and b.ntotal == 0
    b.add(x[:10], ids[:10], "default")
    assert a.ntotal == 400 and b.ntotal == 10
    a.close()
    b.close()
    server_manager_instance.release_server(str(path))  # the in-process Lite server and its file close

    again = MilvusIndex.open(str(path), "g", DIM, model_id="model-a", expected_count=400)
    assert not again.stale and again.ntotal == 400
    assert np.array_equal(again.ids(), np.sort(ids))
    q = data["queries"][1]
    assert_same(again.search(q, K, collection="default"), flat_search(x, ids, q, K))
    assert MilvusIndex.open(str(path), "g", DIM, model_id="model-a", expected_count=401).stale
    assert MilvusIndex.open(str(path), "g", DIM, model_id="model-b").ntotal == 10


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        MilvusIndex.open("redis://h", "g", DIM, model_id="m")
    with pytest.raises(MilvusIndexError, match="does not exist"):
        MilvusIndex.open(str(tmp_path / "no" / "such" / "v.db"), "g", DIM, model_id="m")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(MilvusIndexError, match="could not reach the Milvus server"):
        MilvusIndex.open(f"milvus://127.0.0.1:{port}", "g", DIM, model_id="m", timeout=2)
    idx = MilvusIndex.open(str(tmp_path / "e.db"), "g", DIM, model_id="m")
    with pytest.raises(ValueError):
        idx.add(np.zeros((3, DIM), np.float32), np.arange(2))
    with pytest.raises(MilvusIndexError, match="512-d vectors, not 256-d"):  # a name clash, caught
        MilvusIndex(idx._client, idx.url, idx.name, 256, idx.choice)._create_or_load()
