"""The re-ranked IVF layout ("IVF<n>,PQ<m>x4fs,RFlat"): fast-scan candidates, exact scores, real deletes,
collection selectors and a save / load round trip; and when ``index_factory="auto"`` picks it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from index import faiss_index
from index.faiss_index import (
    AUTO,
    AllowedIds,
    VectorIndex,
    auto_layout,
    auto_nprobe,
    fit_auto_layout,
    layout_rank,
)
from index.gallery import Gallery
from index.records import NewImage

DIM = 16
N = 12_000  # IVF256 trains on 39 * 256 = 9,984 vectors, 4-bit PQ on the same


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(x: np.ndarray, ids: np.ndarray, layout: str) -> VectorIndex:
    return VectorIndex.build(
        DIM,
        AUTO,
        nprobe=None,
        ef_search=64,
        count=len(x),
        train_sample=lambda n: x[:n],
        chunks=lambda: iter([(ids, x)]),
        layout=layout,
    )


def exact_top(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return ids[np.argsort(-(x @ q), kind="stable")[:k]]


def test_auto_picks_the_reranked_layout_from_auto_refine_min() -> None:
    assert auto_layout(99_999) == "IVF1024,Flat"
    assert auto_layout(100_000) == "IVF1024,PQ256x4fs,RFlat" and auto_nprobe("IVF1024,PQ256x4fs,RFlat") == 64
    assert auto_layout(1_000_000) == "IVF4096,PQ256x4fs,RFlat" and auto_nprobe(auto_layout(1_000_000)) == 128
    assert auto_layout(5_000, 300, refine_min=4_000, dim=DIM) == "IVF128,PQ8x4fs,RFlat"
    assert auto_layout(5_000, 6_000, refine_min=4_000) == "Flat"  # Flat below flat_max, whatever refine_min
    # same lists: the re-ranked layout ranks above IVF-Flat, so a growing gallery rebuilds into it
    assert layout_rank("Flat") < layout_rank("IVF1024,Flat") < layout_rank("IVF1024,PQ256x4fs,RFlat")
    assert layout_rank("IVF1024,PQ256x4fs,RFlat") < layout_rank("IVF2048,Flat")
    assert fit_auto_layout(DIM, "IVF1024,PQ256x4fs,RFlat") == "IVF1024,PQ8x4fs,RFlat"
    assert fit_auto_layout(18, "IVF8,PQ256x4fs,RFlat") == "IVF8,PQ9x4fs,RFlat"  # 18 / 2
    assert fit_auto_layout(DIM, "IVF8,Flat") == "IVF8,Flat"


def test_reranked_layout_adds_removes_filters_and_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = unit(rng, N)
    ids = np.arange(N, dtype=np.int64) * 7 + 1000  # not row numbers: the IVF keeps these ids
    vi = build(x, ids, "IVF256,PQ256x4fs,RFlat")  # auto: the PQ size follows the dimension
    assert vi.effective_factory == "IVF256,PQ8x4fs,RFlat" and not vi.is_fallback
    assert vi.nprobe == 64 and vi.ntotal == N and np.array_equal(vi.ids(), ids)

    vi.nprobe = 256  # every list: candidates differ from exact only through the PQ codes
    vi._apply_search_settings()
    for row in (0, 17, 4321):
        scores, found = vi.search(x[row][None, :], 10)
        assert found[0] == ids[row] and scores[0] == pytest.approx(1.0, abs=1e-5)
        # scores are exact inner products, best first
        assert np.allclose(scores, x[(found - 1000) // 7] @ x[row], atol=1e-5)
        assert np.all(np.diff(scores) <= 0)
        assert len(np.intersect1d(found, exact_top(x, ids, x[row], 10))) >= 9

    # a collection (ID selector): only its ids come back, and its own best first
    allowed = AllowedIds(np.sort(ids[1::3]))
    scores, found = vi.search(x[1][None, :], 10, allowed)
    assert found.size == 10 and np.isin(found, allowed.ids).all() and found[0] == ids[1]
    scores, found = vi.search(x[0][None, :], 10, allowed)  # x[0] itself is not in it
    assert ids[0] not in found and np.isin(found, allowed.ids).all()
    small = AllowedIds(np.sort(ids[[5, 6, 7]]))
    _, found = vi.search(x[5][None, :], 10, small)
    assert sorted(found) == sorted(ids[[5, 6, 7]])

    # deletes are real (no tombstones): both parts forget the ids
    gone = ids[:100]
    vi.remove(gone)
    assert vi.tombstone_count == 0 and vi.ntotal == N - 100
    assert np.array_equal(vi.ids(), ids[100:])
    for row in (0, 50):
        _, found = vi.search(x[row][None, :], 10)
        assert not np.isin(found, gone).any()

    # add after remove, then save / load
    extra = unit(rng, 10)
    extra_ids = np.arange(10, dtype=np.int64) + 10_000_000
    vi.add(extra, extra_ids)
    assert vi.ntotal == N - 90
    _, found = vi.search(extra[3][None, :], 5)
    assert found[0] == extra_ids[3]

    path = tmp_path / "index.faiss"
    tag = {"generation": 1, "count": vi.ntotal, "dim": DIM}
    vi.save(path, tag)
    loaded = VectorIndex.load(path, tag, factory=AUTO, nprobe=None, ef_search=64)
    assert loaded is not None and loaded.effective_factory == "IVF256,PQ8x4fs,RFlat"
    assert loaded.nprobe == 64 and loaded.ntotal == vi.ntotal
    assert np.array_equal(loaded.ids(), vi.ids())
    for q in (x[200], x[5000], extra[3]):
        s1, f1 = vi.search(q[None, :], 10)
        loaded.nprobe = vi.nprobe
        loaded._apply_search_settings()
        s2, f2 = loaded.search(q[None, :], 10)
        assert np.array_equal(f1, f2) and np.allclose(s1, s2)
    s1, f1 = loaded.search(x[301][None, :], 10, allowed)  # row 301 is in the collection, and kept
    assert np.isin(f1, allowed.ids).all() and f1[0] == ids[301] and not np.isin(f1, gone).any()
    loaded.remove(extra_ids)  # the loaded one still removes (its id map is rebuilt by read_index)
    assert loaded.ntotal == N - 100 and not np.isin(loaded.ids(), extra_ids).any()
    loaded.add(extra[:1], extra_ids[:1])
    _, found = loaded.search(extra[0][None, :], 1)
    assert found[0] == extra_ids[0]


def test_gallery_rebuilds_into_the_reranked_layout(tmp_path: Path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="index")
    monkeypatch.setattr(faiss_index, "AUTO_REFINE_MIN", 10_000)
    rng = np.random.default_rng(1)
    x = unit(rng, N)
    d = tmp_path / "g"
    with Gallery(d, dim=DIM, model_id="m", auto_flat_max=300) as g:
        recs = g.add(x[:6000], [NewImage(collection="a") for _ in range(6000)])
        assert g.wait_for_rebuild(120)  # IVF-Flat for 6,000
        recs += g.add(x[6000:-1], [NewImage(collection="b") for _ in range(N - 6001)])
        assert g.wait_for_rebuild(120)
        recs += g.add(x[-1:], [NewImage(collection="b")])  # a write once the last rebuild is done
        assert g.wait_for_rebuild(120)
        assert g.effective_index_factory == "IVF256,PQ8x4fs,RFlat"
        assert g.is_consistent()
        assert g.search(x[3], k=1, collection=None)[0].record.image_id == recs[3].image_id
        hits = g.search(x[7000], k=5, collection="a")
        assert hits and all(h.record.collection == "a" for h in hits)
        assert g.delete_image(recs[3].image_id)
        assert all(h.record.image_id != recs[3].image_id for h in g.search(x[3], k=5, collection=None))
        assert g.is_consistent()
    with Gallery(d, dim=DIM, model_id="m", auto_flat_max=300) as g:  # loads the saved index
        assert g.effective_index_factory == "IVF256,PQ8x4fs,RFlat" and g.is_consistent()
        assert g.search(x[9000], k=1, collection=None)[0].record.image_id == recs[9000].image_id
